#!/usr/bin/env bash
# CI, after `make test`: the ranking- and bit-sensitive tests again under other CPU kernel families that
# this machine can emulate, so that no test rests on rounding that changes with the CPU (README "Tests").
#   ATEN_CPU_CAPABILITY                  PyTorch's own kernels and the cpp backend's row passes
#   MKL_ENABLE_INSTRUCTIONS / MKL_CBWR   the code path of MKL, torch's BLAS in this build (matrix products)
#   OPENBLAS_CORETYPE                    the kernels of numpy's OpenBLAS (scikit-learn, triton's interpreter,
#                                        whose tl.dot is numpy's matmul)
# A configuration whose ATEN_CPU_CAPABILITY this CPU cannot run is skipped, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# (the torch.compile cases of test_stats add nothing here but time)
TESTS=(tests/test_retrieval.py tests/test_retrieval_inputs.py tests/test_edge_cases.py tests/test_contract.py
       tests/test_stats.py tests/test_xbm.py tests/test_api.py tests/test_saved_stats.py tests/test_cached.py)
# the triton interpreter's tests (its tl.dot is numpy's matmul, OpenBLAS) once, under the baseline configuration,
# the one farthest from make test's native kernels: 70 s a configuration, which CI's 30 minutes cannot spare twice
TRITON_TESTS=(tests/test_triton.py)
CONFIGS=(
  # an AMD EPYC with AVX-512: PyTorch's AVX-512 kernels, MKL's AVX2 path, OpenBLAS's Zen (Haswell) kernels
  "ATEN_CPU_CAPABILITY=avx512 MKL_ENABLE_INSTRUCTIONS=AVX2 OPENBLAS_CORETYPE=Haswell"
  # an AVX2 machine, MKL's reproducible AVX2 path, OpenBLAS's AVX kernels
  "ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 OPENBLAS_CORETYPE=Sandybridge"
  # baseline x86-64 everywhere
  "ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE OPENBLAS_CORETYPE=Prescott"
)

for config in "${CONFIGS[@]}"; do
  want=$(sed -E 's/.*ATEN_CPU_CAPABILITY=([a-z0-9]+).*/\1/' <<<"$config")
  got=$(env $config "$PY" -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")
  if [ "$got" != "$want" ]; then
    echo "cpu_matrix: skipped $config (this CPU runs $got)"
    continue
  fi
  echo "cpu_matrix: $config"
  extra=()
  [ "$want" = default ] && extra=("${TRITON_TESTS[@]}")
  env $config "$PY" -m pytest "${TESTS[@]}" "${extra[@]}" -q -p no:cacheprovider -k "not torch_compile"
done
