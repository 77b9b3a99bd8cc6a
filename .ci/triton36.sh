#!/usr/bin/env bash
# The GPU image's Triton on the CPU: a second venv (.venv-triton36) beside .venv, with Triton 3.6 as on the
# GPU machine, numpy < 2.4 (Triton 3.6's interpreter converts arrays to scalars in a way numpy 2.4 refuses)
# and the CPU torch build. It runs every triton test of the suite (`pytest tests -k triton`): the kernels
# under TRITON_INTERPRET=1 and the sm_90 compile-statistics tests (kernel_stats.py --compile-only:
# Triton 3.6's compiler and its bundled ptxas against a stub driver).
#
#   bash .ci/triton36.sh                  # (make test-triton36) creates the venv once, then runs the tests
#   bash .ci/triton36.sh --fresh          # removes the venv first (what CI does: it starts from a clean clone)
#   bash .ci/triton36.sh --fresh -x -v    # anything after the options goes to pytest
#
# Python 3.11, not the image's 3.12: a CPU build of torch 2.13.0 exists here only for 3.11 (a local wheel);
# `pip install torch==2.13.0` on 3.12 resolves to PyPI's CUDA build (several GB of nvidia-* wheels).
# The C++ extension is neither built nor loaded (MS_FUSED_NO_CPP=1): `make test` covers the cpp backend.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${TRITON36_VENV:-.venv-triton36}
PYTHON=${TRITON36_PYTHON:-python3.11}
TRITON_SPEC="triton==3.6.0"
# pytest: the runner; numpy: torch's tensor <-> numpy bridge that the interpreter uses
REQUIREMENTS=("$TRITON_SPEC" "numpy<2.4" "pytest>=8")
PY=$VENV/bin/python
STAMP=$VENV/.ms_fused-triton36
start=$(date +%s)

if [[ "${1:-}" == "--fresh" ]]; then
    rm -rf "$VENV"
    shift
fi

export MS_FUSED_NO_CPP=1
# the installed requirements are the stamp's content: a change here reinstalls
wanted="torch==2.13.0 ${REQUIREMENTS[*]}"
if [[ ! -f $STAMP || "$(cat "$STAMP")" != "$wanted" ]]; then
    echo "== triton36: creating $VENV with $($PYTHON --version)"
    test -x "$PY" || "$PYTHON" -m venv "$VENV"
    # the CPU build from the local wheel, first and alone: PyPI's torch==2.13.0 would pin another triton
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q "${REQUIREMENTS[@]}"
    "$PY" -m pip install -q --no-build-isolation -e .
    echo "$wanted" >"$STAMP"
    echo "== triton36: installed in $(( $(date +%s) - start )) s"
fi

"$PY" - <<EOF
import sys, numpy, torch, triton
print(f"== triton36: Python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"triton {triton.__version__}, numpy {numpy.__version__}")
assert triton.__version__.startswith("3.6."), "expected Triton 3.6.x, the GPU image's"
assert tuple(int(p) for p in numpy.__version__.split(".")[:2]) < (2, 4), "Triton 3.6's interpreter needs numpy < 2.4"
EOF

# conftest.py switches the interpreter on (no CUDA here); the compile test takes it off for its subprocess
unset TRITON_INTERPRET
rc=0
# the compile tests under 3.6: sm_90, the GPU image's target (sm_100 spills a few bytes under 3.6, so "auto"
# leaves it to torch there: newest_compiled_cc in ms_fused/engine/triton/backend.py); every target runs under
# 3.9 in `make test`
MS_FUSED_COMPILE_TARGETS=sm_90 "$PY" -m pytest tests -k triton -q -p no:cacheprovider -rfEs "$@" || rc=$?
echo "== triton36: pytest exit code $rc after $(( $(date +%s) - start )) s in all"
exit $rc
