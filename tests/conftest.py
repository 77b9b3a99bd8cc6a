import getpass
import os
import pathlib
import sys
import tempfile

import pytest
import torch

# the benchmark scripts (run, report, measure, bench_cached, ...) import one another by module name
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

# Inductor's FX graph cache is not keyed on ATEN_CPU_CAPABILITY: a graph compiled to AVX-512 vector code by an
# earlier run is reused under ATEN_CPU_CAPABILITY=default, whose headers have no at::vec (a C++ compile error
# in test_compile). One cache directory per forced capability keeps them apart.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY'].lower()}")

# Triton kernels only run on the CPU through its interpreter, which must be switched on before any
# @triton.jit decorator runs (i.e. before ms_fused.engine.triton.backend is first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from backends_under_test import ALL_BACKENDS, backend_params  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture(params=backend_params(ALL_BACKENDS))
def backend(request):
    """Every backend, interpreted triton included (skipped with the reason where a backend cannot run).
    Tests that take it keep their sizes small (N, M ≲ 130): the interpreter runs each program in Python."""
    return request.param
