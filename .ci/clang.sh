#!/usr/bin/env bash
# The cpp backend built with clang (and libomp) instead of GCC: tests/test_cpp.py and the pair-weighting losses'
# cpp tests against that build, and the
# one-thread warning of a clang JIT build without OpenMP (tests/test_openmp_note.py). The build goes to a copy
# of the tree (build/clang, .ci/build_copy.sh), so .venv's GCC build is left alone. Installs clang and libomp-dev
# with apt-get where they are missing. Needs .venv (make install). About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang++ > /dev/null || ! echo '#include <omp.h>' | clang++ -fopenmp -x c++ -fsyntax-only - 2> /dev/null; then
  if [ "$(id -u)" = 0 ]; then apt=(apt-get); else apt=(sudo apt-get); fi
  "${apt[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -qq --no-install-recommends clang libomp-dev > /dev/null
fi
clang++ --version | head -1
dest=build/clang
bash .ci/build_copy.sh clang clang++ "$dest" .venv/bin/python
py="$PWD/.venv/bin/python"
cd "$dest"
PYTHONPATH="$PWD" "$py" -c "
import torch
from ms_fused.engine.cpp import backend as cpp_backend
isa = cpp_backend.cpu_capability()  # loads the extension
assert torch.ops.ms_fused.built_with_openmp(), 'the clang build has no OpenMP'
print('clang build:', cpp_backend.__file__, isa, 'with OpenMP')"
PYTHONPATH="$PWD" "$py" -m pytest tests/test_cpp.py -q -p no:cacheprovider
# the pair-weighting losses' cpp kernels (csrc/cpu/pair_*.cpp: row blocks, self-mode triangle) against pml and the
# reference, on this build
PYTHONPATH="$PWD" "$py" -m pytest tests/test_pair_losses.py tests/test_pair_losses_pml_parity.py -q -p no:cacheprovider \
    -k cpp -m "not slow"
CXX=clang++ PYTHONPATH="$PWD" "$py" -m pytest tests/test_openmp_note.py -q -p no:cacheprovider
