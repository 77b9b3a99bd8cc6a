"""Build script. What each way of installing gives (README "Install"):

- `pip install .` (pip's build isolation): torch is not importable while building, so the pure-Python package
  is built, with the C++ sources inside it (ms_fused/_csrc); the `cpp` backend compiles them on first use.
- `pip install --no-build-isolation [-e] .` on top of an installed torch: the C++ extension is compiled now.
"""
import importlib.util
import os

from setuptools import find_packages, setup

NO_CPP_HINT = "the `cpp` backend then falls back to `torch`; install a C++ compiler and rerun " \
              "`pip install --no-build-isolation -e .` to build it"


def _build_flags():
    """csrc/build_flags.py, loaded by path (it is not part of the installed package)."""
    spec = importlib.util.spec_from_file_location("ms_fused_build_flags", os.path.join("csrc", "build_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpp_extensions():
    """The `cpp` backend's extension (csrc/), built with torch's cpp_extension and ninja.

    Skipped, not failed, when there are no sources, when MS_FUSED_NO_CPP=1, or when the build itself fails
    (no compiler, ...): the package then falls back to its pure-PyTorch backend.
    """
    flags = _build_flags()
    sources = [os.path.relpath(s) for s in flags.sources(os.path.abspath("csrc"))]
    if not sources or os.environ.get("MS_FUSED_NO_CPP") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # pip's isolated build environment has no torch
        print("NOTE: ms_fused: torch is not importable while building (pip's build isolation), so the C++ "
              "extension is not built now; its sources ship in the package and the `cpp` backend compiles them "
              "on first use (needs a C++ compiler). `pip install --no-build-isolation .` builds it now.")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A failed extension build is a warning, not a failed install."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # compiler missing or failing: keep the pure-Python package
                print(f"WARNING: ms_fused: building the C++ extension failed ({type(exc).__name__}: {exc}); "
                      f"{NO_CPP_HINT}")
                self.extensions = []

        def get_outputs(self):
            return [] if not self.extensions else super().get_outputs()

    cflags, ldflags, note = flags.extension_flags()
    if note:
        print(f"WARNING: ms_fused: {note}")
    ext = CppExtension("ms_fused._C", sources, extra_compile_args={"cxx": cflags}, extra_link_args=ldflags)
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = cpp_extensions()

setup(
    name="ms_fused",
    version="0.1.0",
    description="Exact, memory-lean Multi-Similarity loss with fused Triton and C++ kernels",
    # the C++ sources travel inside the package (ms_fused/_csrc) for the JIT build of an installed copy
    packages=find_packages(include=["ms_fused", "ms_fused.*"]) + ["ms_fused._csrc"],
    package_dir={"ms_fused._csrc": "csrc"},
    package_data={"ms_fused._csrc": ["*.py", "*.cpp", "cpu/*.cpp", "cpu/*.h"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    # sentence-transformers' own requirement "torch>=..." is met by the torch already installed; its [train]
    # extra brings datasets and accelerate, which SentenceTransformerTrainer needs
    extras_require={"triton": ["triton>=3.6"], "sentence-transformers": ["sentence-transformers[train]>=6"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
