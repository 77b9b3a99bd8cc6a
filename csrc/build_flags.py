"""Sources and compiler flags of the C++ extension, shared by setup.py and the JIT build of ms_fused/cpp_backend.py.

OpenMP is used where torch itself was built with it and the compiler can link it; without it the extension
still builds (the row passes then run on one thread) and `openmp_note` says why.
"""
from __future__ import annotations

import glob
import os
import subprocess
import tempfile
from typing import List, Optional, Tuple

CSRC = os.path.dirname(os.path.abspath(__file__))

# -fno-trapping-math lets the compiler turn the row passes' selects into vector blends (torch is built with it)
BASE_FLAGS = ["-O3", "-fno-trapping-math", "-fno-math-errno"]

_OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
_PLAIN_PROBE = "int main() { return 0; }\n"


def sources(csrc: str = CSRC) -> List[str]:
    return sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))


def _compiles(flags: List[str], code: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(code)
        try:
            subprocess.run([cxx, *flags, src, "-o", os.path.join(tmp, "probe")], capture_output=True, timeout=120,
                           check=True)
        except (OSError, subprocess.SubprocessError):
            return False
    return True


def extension_flags() -> Tuple[List[str], List[str], Optional[str]]:
    """(compile flags, link flags, a note when OpenMP is left out and why)."""
    import torch

    if not _compiles([], _PLAIN_PROBE):
        return BASE_FLAGS, [], f"no working C++ compiler ({os.environ.get('CXX', 'c++')}) was found"
    if not torch.backends.openmp.is_available():
        note = "torch was built without OpenMP, so the extension is too (its row passes run on one thread)"
    elif not _compiles(["-fopenmp"], _OPENMP_PROBE):
        note = ("the C++ compiler cannot build OpenMP code (-fopenmp failed); the extension is built without it "
                "and its row passes run on one thread")
    else:
        return BASE_FLAGS + ["-fopenmp"], ["-fopenmp"], None
    simd = ["-fopenmp-simd"] if _compiles(["-fopenmp-simd"], _PLAIN_PROBE) else []
    return BASE_FLAGS + simd, [], note
