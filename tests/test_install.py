"""`pip install .` as users run it (build isolation on): a wheel and an sdist, each installed into a fresh venv
that already has torch, run the loss on the `cpp` backend, whose C++ sources ship inside the package and are
JIT-compiled on first use (pip's isolated build environment has no torch, so nothing is compiled at install).

Slow (one C++ compile, shared by both installs through one TORCH_EXTENSIONS_DIR): marked `slow`, run by
`make test-slow`; tests/test_jit_lock.py and tests/test_cpp.py cover the JIT path's lock and fallback quickly.
"""
import os
import shutil
import subprocess
import sys
import venv

import pytest
import torch

pytestmark = pytest.mark.slow  # `make test-slow`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN = r"""
import os, sys, torch, ms_fused
from ms_fused.engine.cpp import backend as cpp_backend
from ms_fused import multi_similarity_loss
assert os.path.realpath(ms_fused.__file__).startswith(os.path.realpath(sys.prefix)), ms_fused.__file__
assert os.path.isfile(os.path.join(os.path.dirname(ms_fused.__file__), "_csrc", "cpu", "row_kernels.h"))
assert cpp_backend.unavailable_reason(torch.device("cpu")) is None, cpp_backend.unavailable_reason(torch.device("cpu"))
g = torch.Generator().manual_seed(0)
x, y = torch.randn(64, 16, generator=g, dtype=torch.float64), torch.randint(0, 6, (64,), generator=g)
ours = multi_similarity_loss(x, y, backend="cpp")
ref = multi_similarity_loss(x, y, backend="reference")
assert abs(float(ours - ref)) <= 1e-12 * abs(float(ref)), (float(ours), float(ref))
print("cpp loss ok", float(ours))
"""


def run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A wheel and an sdist of the working tree, built as `pip wheel .` and `python -m build --sdist` do."""
    tmp = tmp_path_factory.mktemp("install")
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT).split()
    src = tmp / "src"
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(src / f), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), src / f)
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(src)])
    run([sys.executable, "-m", "build", "--sdist", "--outdir", str(dist), str(src)])
    return {"wheel": next(dist.glob("*.whl")), "sdist": next(dist.glob("*.tar.gz")), "tmp": tmp}


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installed_package_runs_the_cpp_backend(artifacts, kind):
    env_dir = artifacts["tmp"] / f"venv-{kind}"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    site = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    # the fresh venv "already has torch": this interpreter's, without installing it again
    with open(os.path.join(site, "torch_from_test_env.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    out = run([py, "-m", "pip", "install", "--no-deps", str(artifacts[kind])])
    assert "Successfully installed ms_fused" in out or "Successfully installed ms-fused" in out, out
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(artifacts["tmp"] / "torch_extensions"))
    env.pop("MS_FUSED_NO_CPP", None)
    assert "cpp loss ok" in run([py, "-c", RUN], env=env, cwd=str(artifacts["tmp"]))
