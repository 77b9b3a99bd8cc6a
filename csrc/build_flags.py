"""Sources and compiler flags of the C++ extension, shared by setup.py and the JIT build of
ms_fused/engine/cpp/backend.py.

OpenMP is used where torch itself was built with it and the compiler can link it: GCC's -fopenmp, clang's
libomp on Linux (-fopenmp=libomp; Debian's clang needs libomp-dev), and on macOS Apple clang with Homebrew's
libomp (-Xpreprocessor -fopenmp -lomp). Without it the extension still builds, its row passes then run on
one thread, and extension_flags' note says so and how to get OpenMP.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
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


def _is_clang() -> bool:
    try:
        out = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" in out.stdout.lower()


def _homebrew_libomp() -> List[str]:
    """Prefixes of Homebrew's libomp (Apple silicon, then Intel), those that exist."""
    prefixes = [os.path.join(p, "opt", "libomp") for p in (os.environ.get("HOMEBREW_PREFIX"), "/opt/homebrew", "/usr/local") if p]
    return [p for p in dict.fromkeys(prefixes) if os.path.isfile(os.path.join(p, "include", "omp.h"))]


def _openmp_candidates() -> List[Tuple[List[str], List[str]]]:
    """(compile flags, link flags) to try in turn."""
    candidates = [(["-fopenmp"], ["-fopenmp"]), (["-fopenmp=libomp"], ["-fopenmp=libomp"])]
    if sys.platform == "darwin":
        import torch

        # torch's wheel carries its own libomp: linking that one keeps a single OpenMP runtime in the process
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        for prefix in _homebrew_libomp():
            lib = torch_lib if os.path.isfile(os.path.join(torch_lib, "libomp.dylib")) else os.path.join(prefix, "lib")
            candidates.append((["-Xpreprocessor", "-fopenmp", "-I" + os.path.join(prefix, "include")],
                               ["-L" + lib, "-lomp", "-Wl,-rpath," + lib]))
    return candidates


def openmp_hint() -> str:
    """How to get an OpenMP the compiler links, on this platform."""
    if sys.platform == "darwin":
        how = "install Homebrew's libomp (`brew install libomp`)"
    elif _is_clang():
        how = "install clang's OpenMP runtime (Debian/Ubuntu: `apt-get install libomp-dev`) or build with GCC (CXX=g++)"
    else:
        how = "use a compiler with OpenMP (GCC, or clang with libomp)"
    return (f"to get OpenMP, {how} and rebuild (`pip install --no-build-isolation .`; a JIT-built extension is "
            f"rebuilt at the next first use)")


def extension_flags() -> Tuple[List[str], List[str], Optional[str]]:
    """(compile flags, link flags, a note when the row passes will run on one thread, why and what to do)."""
    import torch

    if not _compiles([], _PLAIN_PROBE):
        return BASE_FLAGS, [], f"no working C++ compiler ({os.environ.get('CXX', 'c++')}) was found"
    if torch.backends.openmp.is_available():
        for cflags, ldflags in _openmp_candidates():
            if _compiles(cflags + ldflags, _OPENMP_PROBE):
                return BASE_FLAGS + cflags, ldflags, None
        note = (f"the C++ compiler ({os.environ.get('CXX', 'c++')}) cannot build OpenMP code, so the extension is "
                f"built without it and its row passes run on one thread; {openmp_hint()}")
    else:  # torch's own thread pool runs at::parallel_for then (ATen/ParallelNative.h): no OpenMP needed here
        note = None
    simd = ["-fopenmp-simd"] if _compiles(["-fopenmp-simd"], _PLAIN_PROBE) else []
    return BASE_FLAGS + simd, [], note
