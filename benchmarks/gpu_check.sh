#!/usr/bin/env bash
# GPU check: the Triton tests on CUDA, then a short benchmark (triton and torch backends, pml, one
# torch.mm(X, X.T)) whose tables land in benchmarks/results/<gpu>/gpu_check/. Whole run < 8 minutes.
#
#   bash benchmarks/gpu_check.sh             # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run   # on a CPU: same plumbing, tiny sweep, results in /tmp
#
# Needs only what a bare GPU image has (python, torch, triton): nothing is installed. The repository goes
# on PYTHONPATH (the C++ extension is not built; it is a CPU backend). pml, pytest, tqdm and matplotlib
# are used when importable and recorded as missing when not. Extra pure-Python packages can be put in
# $VENDOR_DIR (default benchmarks/.vendor), which is added to PYTHONPATH when it exists.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-450}            # the whole script; the lease allows 8 minutes
PYTEST_TIMEOUT_S=${PYTEST_TIMEOUT_S:-150}
RECORD_TIMEOUT_S=${RECORD_TIMEOUT_S:-45}
REPORT_RESERVE_S=40                  # left after the sweep's deadline: plots, tables, process exits
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1

PY=${PYTHON:-$(command -v python3 || command -v python)}
VENDOR_DIR=${VENDOR_DIR:-$PWD/benchmarks/.vendor}
export PYTHONPATH="$PWD${VENDOR_DIR:+:$VENDOR_DIR}${PYTHONPATH:+:$PYTHONPATH}"
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
$PY - <<'EOF'
import importlib.util
for name in ("triton", "pytest", "pytorch_metric_learning", "tqdm", "matplotlib"):
    print(f"   {name}: {'found' if importlib.util.find_spec(name) else 'MISSING'}")
EOF

# 1. the GPU tests
tests_rc=0
if ! $PY -c 'import pytest' 2>/dev/null; then
    echo "== pytest is not installed: GPU tests NOT run"
    tests_rc=3
elif [[ $DRY_RUN == 1 ]]; then
    echo "== (dry run) collecting tests/test_triton.py only"
    timeout 120 $PY -m pytest tests/test_triton.py -q --collect-only -p no:cacheprovider | tail -3
    tests_rc=${PIPESTATUS[0]}
else
    echo "== pytest tests/test_triton.py (time-out ${PYTEST_TIMEOUT_S} s)"
    timeout -k 10 "$PYTEST_TIMEOUT_S" $PY -m pytest tests/test_triton.py -q -p no:cacheprovider
    tests_rc=$?
    [[ $tests_rc == 124 ]] && echo "== GPU tests TIMED OUT after ${PYTEST_TIMEOUT_S} s"
fi
echo "== tests exit code $tests_rc after $(elapsed) s"

# 2. the benchmark, bounded by a global deadline: records that would start after it are recorded as skipped
deadline=$(( BUDGET_S - $(elapsed) - REPORT_RESERVE_S ))
if (( deadline < 30 )); then
    echo "== no time left for the benchmark (${deadline} s)" >&2
    exit 1
fi
if [[ $DRY_RUN == 1 ]]; then
    sweep=(--device cpu --n 256,512 --d 32,64 --dtypes float32 --out /tmp/ms_fused_gpu_check_dry_run)
else
    sweep=(--device cuda --n 4096,8192,16384,32768,65536 --d 128,512 --dtypes float32,bfloat16 --tag gpu_check)
fi
echo "== benchmark, deadline ${deadline} s"
timeout -k 10 $(( deadline + REPORT_RESERVE_S - 5 )) \
    $PY benchmarks/run.py "${sweep[@]}" --impls ms_fused:triton,ms_fused:torch,pml,mm \
    --modes forward,forward_backward --timeout "$RECORD_TIMEOUT_S" --deadline "$deadline" \
    --target-s 0.1 --min-repeats 3 --max-repeats 10
bench_rc=$?
# the device runner brings back only what is under $OUT
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
    cp -r benchmarks/results "$OUT/" 2>/dev/null
    [[ $DRY_RUN == 1 ]] && cp -r /tmp/ms_fused_gpu_check_dry_run "$OUT/" 2>/dev/null
fi
echo "== benchmark exit code $bench_rc; total $(elapsed) s"
(( tests_rc != 0 )) && exit 1
exit $bench_rc
