"""A C++ compiler without OpenMP (Debian's clang without libomp-dev, Apple clang without Homebrew's libomp): the
extension still builds, and its first use in each process warns once that the row passes run on one thread and
how to get OpenMP — here on the JIT path (`pip install .`, then first use), in a copy of the package without
ms_fused/_C. The compiler is $CXX (default c++) behind a wrapper that refuses every OpenMP flag.

Slow: one C++ compile (about a minute on 2 cores).
"""
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NO_OPENMP_CXX = """#!/bin/sh
for a in "$@"; do case "$a" in -fopenmp|-fopenmp=*|-Xpreprocessor) echo "no OpenMP in this compiler" >&2; exit 1;; esac; done
exec {cxx} "$@"
"""

FIRST_USE = r"""
import sys, warnings
# an editable install's finder would serve ms_fused._C from the installed tree: this copy has none
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", None) or "")]
import torch
from ms_fused import multi_similarity_loss
g = torch.Generator().manual_seed(0)
x, y = torch.randn(96, 12, generator=g, dtype=torch.float64), torch.randint(0, 7, (96,), generator=g)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ours = [multi_similarity_loss(x, y, backend=b) for b in ("cpp", "cpp", "auto")]
ref = multi_similarity_loss(x, y, backend="reference")
print(max(abs(float(o - ref)) for o in ours) / abs(float(ref)))
print(torch.ops.ms_fused.built_with_openmp())
for w in caught:
    print("WARNING", str(w.message).replace("\n", " "))
"""


@pytest.fixture(scope="module")
def package_without_extension(tmp_path_factory):
    """ms_fused's Python files and csrc/ (no compiled extension), a compiler without OpenMP, a fresh build cache."""
    tmp = tmp_path_factory.mktemp("openmp_note")
    src = tmp / "src"
    shutil.copytree(os.path.join(ROOT, "ms_fused"), src / "ms_fused", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "csrc"), src / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
    cxx = tmp / "cxx-without-openmp"
    cxx.write_text(NO_OPENMP_CXX.format(cxx=shutil.which(os.environ.get("CXX", "c++")) or "c++"))
    cxx.chmod(cxx.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PYTHONPATH=str(src), CXX=str(cxx), TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"))
    env.pop("MS_FUSED_NO_CPP", None)
    return src, env


def first_use(src, env):
    out = subprocess.run([sys.executable, "-c", FIRST_USE], cwd=str(src), env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    error, openmp, *warnings = out.stdout.strip().splitlines()
    return float(error), openmp, [w for w in warnings if "one thread" in w]  # (other notes, e.g. "compiling", aside)


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch runs without OpenMP: nothing to warn about")
def test_jit_build_without_openmp_warns_once_per_process(package_without_extension):
    src, env = package_without_extension
    for build in ("compiled now", "cached by torch"):
        error, openmp, warnings = first_use(src, env)
        assert error <= 1e-12, build  # the loss itself is right, on one thread
        assert openmp == "False", build
        assert len(warnings) == 1, (build, warnings)
        assert "ms_fused" in warnings[0] and "to get OpenMP" in warnings[0], warnings[0]
