#!/usr/bin/env bash
# GPU check, in the order that matters when device time is short (whole run < 8 minutes):
#   1. the target point (run.py --preset goals): N = 32768, D = 512, bfloat16, triton against pml and one
#      torch.mm(X, X.T), with the Triton goals checked in its report;
#   2. the memory-bank point (run.py --preset bank): N = 256 anchors against a memory of 100 000 rows, D = 128;
#   3. the largest self-mode batch the triton backend completes (up to 2^20 at D = 512, bfloat16);
#   4. the GPU tests: tests/test_triton.py (parity, the extra-memory bound with a 132-SM plan, a memory bank
#      of 10^6 rows at D = 100), tests/test_triton_half.py (bfloat16 / float16 forward and backward against
#      float64), and the CUDA cases of tests/test_compile.py (torch.compile fullgraph of a training step,
#      mode="reduce-overhead", i.e. CUDA graphs).
# Tables land in benchmarks/results/$RESULTS_NAME/{target,memory_bank,largest}/ (default h200).
#
#   bash benchmarks/gpu_check.sh             # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run   # on a CPU: same plumbing, tiny sweep, results in /tmp
#
# Needs only what a bare GPU image has (python, torch, triton): nothing is installed. The repository goes
# on PYTHONPATH (the C++ extension is not built; it is a CPU backend). pml, pytest, tqdm and matplotlib
# are used when importable and recorded as missing when not. The GPU machine reaches no registry, so pml
# comes as wheels in $VENDOR_DIR (default benchmarks/.vendor), filled beforehand where a registry is reached:
#   make vendor      # pytorch-metric-learning and what its losses and miners import (tqdm, scipy), Python 3.12
# and carried with the run (the device tool's carry: ["benchmarks/.vendor"]). Unless pml already imports,
# the wheels are unpacked into $VENDOR_SITE (default /tmp/ms_fused_vendor_site), on PYTHONPATH as is
# $VENDOR_DIR itself.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-450}            # the whole script; the lease allows 8 minutes
PYTEST_TIMEOUT_S=${PYTEST_TIMEOUT_S:-180}
RECORD_TIMEOUT_S=${RECORD_TIMEOUT_S:-60}
RESULTS_NAME=${RESULTS_NAME:-h200}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1

PY=${PYTHON:-$(command -v python3 || command -v python)}
VENDOR_DIR=${VENDOR_DIR:-$PWD/benchmarks/.vendor}
VENDOR_SITE=${VENDOR_SITE:-${TMPDIR:-/tmp}/ms_fused_vendor_site}
export PYTHONPATH="$PWD${VENDOR_DIR:+:$VENDOR_DIR:$VENDOR_SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! $PY -c 'import torch' 2>/dev/null; then
    echo "$PY cannot import torch; set PYTHON=/path/to/python" >&2
    exit 2
fi
echo "== gpu_check: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)')"
if [[ $DRY_RUN == 0 ]] && ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device here; use --dry-run to exercise the script on a CPU" >&2
    exit 2
fi
# pml and pytest: the image's own when they import, else the vendored wheels (make vendor), unpacked
# outside the repository (a wheel is a zip file, and scipy's compiled modules cannot be imported from one)
pml_imports() { $PY -c 'import pytorch_metric_learning.losses, pytorch_metric_learning.miners' 2>/dev/null; }
pytest_imports() { $PY -c 'import pytest' 2>/dev/null; }
rm -rf "$VENDOR_SITE"
wheels=()
if [[ -n "$VENDOR_DIR" && -d "$VENDOR_DIR" ]]; then
    shopt -s nullglob
    wheels=("$VENDOR_DIR"/*.whl)
    shopt -u nullglob
fi
if (( ${#wheels[@]} )) && ! { pml_imports && pytest_imports; }; then
    if $PY -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
            "$VENDOR_SITE" "${wheels[@]}"; then
        echo "== vendored: ${#wheels[@]} wheels of $VENDOR_DIR unpacked into $VENDOR_SITE"
    else
        echo "== vendored: unpacking $VENDOR_DIR/*.whl FAILED" >&2
    fi
    if ! pml_imports; then
        # a pml that is found but does not import would fail every pml record: recorded as not installed instead
        rm -rf "$VENDOR_SITE"/pytorch_metric_learning
        echo "== vendored pml set aside: it does not import from the wheels with this Python"
    fi
fi
$PY - <<'EOF'
import importlib.util
import sys
for name in ("triton", "pytest", "tqdm", "matplotlib"):
    print(f"   {name}: {'found' if importlib.util.find_spec(name) else 'MISSING'}")
try:  # what impls.pml_loss imports: the package alone is not enough (its losses import scipy and tqdm)
    import pytorch_metric_learning
    import pytorch_metric_learning.losses, pytorch_metric_learning.miners  # noqa: E401
    print(f"   pytorch_metric_learning: found {pytorch_metric_learning.__version__} "
          f"({pytorch_metric_learning.__file__.rsplit('/pytorch_metric_learning/', 1)[0]})")
except Exception as exc:
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    print(f"   pytorch_metric_learning: MISSING ({type(exc).__name__}: {exc})\n"
          "== pml MISSING: the target point is timed WITHOUT pml (its goal unchecked). This machine reaches no\n"
          f"   registry: run `make vendor VENDOR_PYTHON={py}` beforehand where one is reached (wheels into\n"
          "   benchmarks/.vendor) and carry benchmarks/.vendor with this run. The rest runs as usual.")
EOF

# each step is a run.py sweep bounded by its own share of the budget: "benchmark STEP SECONDS ARGS..."
results=benchmarks/results/$RESULTS_NAME
[[ $DRY_RUN == 1 ]] && results=/tmp/ms_fused_gpu_check_dry_run
bench_rc=0
mkdir -p "$results"
benchmark() {
    local step=$1 seconds=$2
    shift 2
    local left=$(( BUDGET_S - $(elapsed) - PYTEST_TIMEOUT_S - 15 ))
    (( seconds > left )) && seconds=$left
    if (( seconds < 20 )); then
        echo "== $step: no time left (${seconds} s)"
        bench_rc=1
        return
    fi
    echo "== $step (deadline ${seconds} s)"
    timeout -k 10 $(( seconds + 30 )) $PY benchmarks/run.py "$@" --out "$results/$step" \
        --timeout "$RECORD_TIMEOUT_S" --deadline "$seconds" --min-repeats 3 --max-repeats 10 --no-progress
    local rc=$?
    (( rc != 0 )) && bench_rc=$rc
    echo "== $step exit code $rc after $(elapsed) s"
}

if [[ $DRY_RUN == 1 ]]; then
    dev=(--device cpu --dtypes float32 --target-s 0.05)
    benchmark target 60 --preset goals "${dev[@]}" --n 512 --d 64 --impls ms_fused:torch,pml,mm
    benchmark memory_bank 60 --preset bank "${dev[@]}" --n 128 --memory 4096 --d 32 --impls ms_fused:torch,pml,mm --no-check
    benchmark largest 60 "${dev[@]}" --n 1024,2048 --d 64 --impls ms_fused:torch --modes forward_backward --no-check
else
    # the goals and bank presets (sweep.PRESETS) are the target point and the memory-bank point, goals checked
    benchmark target 110 --preset goals --device cuda
    benchmark memory_bank 50 --preset bank --device cuda --no-check
    benchmark largest 60 --device cuda --dtypes bfloat16 --target-s 0.2 --n 65536,131072,262144,524288,1048576 \
        --d 512 --impls ms_fused:triton,mm --modes forward_backward --no-check --no-plots
fi

# the roofline predictions (benchmarks/results/kernel_stats.json, sass_stats.json) beside what was just measured
$PY benchmarks/prediction.py "$results" --out "$results/prediction.md" || echo "== prediction table failed"

# 4. the GPU tests, last: the figures above are what a short lease must not lose
GPU_TESTS=(tests/test_triton.py tests/test_triton_half.py tests/test_triton_pair_losses.py tests/test_compile.py
           -k "triton or cuda")
tests_rc=0
if ! $PY -c 'import pytest' 2>/dev/null; then
    echo "== pytest is not installed: GPU tests NOT run"
    tests_rc=3
elif [[ $DRY_RUN == 1 ]]; then
    echo "== (dry run) collecting the GPU tests only"
    timeout 120 $PY -m pytest "${GPU_TESTS[@]}" -q --collect-only -p no:cacheprovider | tail -3
    tests_rc=${PIPESTATUS[0]}
else
    echo "== pytest ${GPU_TESTS[*]} (time-out ${PYTEST_TIMEOUT_S} s)"
    timeout -k 10 "$PYTEST_TIMEOUT_S" $PY -m pytest "${GPU_TESTS[@]}" -q -p no:cacheprovider 2>&1 \
        | tee "$results/gpu_tests.log"
    tests_rc=${PIPESTATUS[0]}
    [[ $tests_rc == 124 ]] && echo "== GPU tests TIMED OUT after ${PYTEST_TIMEOUT_S} s"
fi
echo "== tests exit code $tests_rc; total $(elapsed) s"

# the device runner brings back only what is under $OUT (at most 8 files: the markdown and JSON tables)
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
    for step in target memory_bank largest; do
        cp "$results/$step/results.md" "$OUT/$step.md" 2>/dev/null
        cp "$results/$step/results.json" "$OUT/$step.json" 2>/dev/null
    done
    cp "$results/gpu_tests.log" "$OUT/" 2>/dev/null
    cp "$results/prediction.md" "$OUT/" 2>/dev/null
fi
(( tests_rc != 0 )) && exit 1
exit $bench_rc
