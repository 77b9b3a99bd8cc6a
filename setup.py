"""Install with `pip install --no-build-isolation -e .` on top of an installed torch."""
import glob
import os

from setuptools import find_packages, setup


def cpp_extensions():
    """The `cpp` backend's extension (csrc/), built with torch's cpp_extension and ninja.

    Skipped, not failed, when there are no sources yet or MS_FUSED_NO_CPP=1; the package then
    falls back to its pure-PyTorch backend.
    """
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources or os.environ.get("MS_FUSED_NO_CPP") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension("ms_fused._C", sources, extra_compile_args={"cxx": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cpp_extensions()

setup(
    name="ms_fused",
    version="0.1.0",
    description="Exact, memory-lean Multi-Similarity loss with fused Triton and C++ kernels",
    packages=find_packages(include=["ms_fused", "ms_fused.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton>=3.6"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
