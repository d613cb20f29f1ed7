"""Packaging: python/fastbon is the package, kernels/ its Triton kernels (as fastbon.kernels), csrc/ builds fastbon._C.

The extension builds with torch's cpp_extension against the torch already installed, so install with
``pip install --no-build-isolation -e ".[test]"`` (or ``pip install --no-build-isolation .``).

The build is strict: on a machine with a C++ compiler, an install where fastbon._C does not build (torch not
importable at build time, a compile error) fails, so CI cannot pass on the torch/triton backends alone. Only without
any C++ compiler, or with FASTBON_NO_EXTENSION=1, does fastbon install as pure Python (torch and triton backends).

Environment:
  FASTBON_NO_EXTENSION=1   install without the C++ extension (pure Python), even where a compiler exists
  FASTBON_BUILD_CUDA=0/1   build the CUDA kernels (default: when torch has CUDA and nvcc is found)
  FASTBON_CUDA_ARCHS       CUDA architectures, e.g. "8.0;9.0a" (default: TORCH_CUDA_ARCH_LIST, then torch's choice)
  MAX_JOBS                 parallel compile jobs (default 2)
"""

import glob
import os
import shlex
import shutil
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py

OPT_OUT = "set FASTBON_NO_EXTENSION=1 to install fastbon as pure Python (torch and triton backends only)"


def _cxx_compiler() -> str | None:
    """The C++ compiler the build would run (CXX, else c++ / g++ / clang++ on PATH), or None."""
    candidates = [shlex.split(os.environ["CXX"])[0]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def _extension_build():
    """(ext_modules, cmdclass) for fastbon._C; nothing when opted out or when no C++ compiler exists."""
    if os.environ.get("FASTBON_NO_EXTENSION") == "1":
        return [], {}
    if _cxx_compiler() is None:
        warnings.warn(f"no C++ compiler found (CXX, c++, g++, clang++): installing fastbon without its C++ "
                      f"extension fastbon._C; {OPT_OUT} to silence this", stacklevel=1)
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError as error:
        raise RuntimeError(f"torch must be importable to build fastbon's C++ extension: install torch first and "
                           f"then fastbon with pip install --no-build-isolation ({error}); or {OPT_OUT}") from error
    import torch

    requested = os.environ.get("FASTBON_BUILD_CUDA")
    build_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None) if requested is None \
        else requested == "1"
    if os.environ.get("FASTBON_CUDA_ARCHS"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["FASTBON_CUDA_ARCHS"]
    os.environ.setdefault("MAX_JOBS", "2")

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings/ops.cpp"]
    # No -march: the kernels pick AVX-512 / AVX2 / baseline code at run time (csrc/cpu/kernel_utils.h).
    # -fno-trapping-math (torch's own flag) lets GCC if-convert the selects in the vector loops (exp_nonpositive's
    # clamp): with trapping math the softmax exp loops stayed scalar. It changes no result: no reassociation.
    # -ffp-contract=fast (GCC's default before GCC 13 changed it for -std=c++NN) pins a*b + c to one FMA on every
    # compiler, so the kernels' bits do not change with the compiler's version.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=fast", "-Wno-psabi"]
    options = dict(name="fastbon._C", extra_link_args=["-fopenmp"], define_macros=[])
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/bindings/cuda_ops.cpp"]
        options["define_macros"].append(("FASTBON_WITH_CUDA", None))
        options["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-DFASTBON_WITH_CUDA"]}
        extension = cpp_extension.CUDAExtension(sources=sources, **options)
    else:
        options["extra_compile_args"] = {"cxx": cxx_flags}
        extension = cpp_extension.CppExtension(sources=sources, **options)

    class StrictBuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """torch's build, with a failure that says how to opt out."""

        def run(self):
            try:
                super().run()
            except Exception as error:
                raise RuntimeError(f"building fastbon's C++ extension fastbon._C failed: {error}; fix the build "
                                   f"(the compiler's output is above), or {OPT_OUT}") from error

    return [extension], {"build_ext": StrictBuildExtension}


class BuildPyWithKernels(build_py):
    """build_py that adds the top-level kernels/*.py to the package fastbon.kernels (why: the comment at setup())."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "fastbon.kernels":
            modules += [(package, os.path.basename(path)[:-3], path) for path in sorted(glob.glob("kernels/*.py"))]
        return modules


ext_modules, cmdclass = _extension_build()

setup(
    packages=["fastbon", "fastbon.ops", "fastbon.kernels", "fastbon.models", "fastbon.integrations", "fastbon.jobs",
              "fastbon.demos", "fastbon.serve"],
    # fastbon.kernels: the Triton kernel files live in the top-level kernels/ folder, which has no __init__.py so that
    # it never shadows PyPI's kernels (transformers probes it) for Python started in the repository root: an
    # installed regular package outranks a namespace folder. It is not mapped through package_dir: setuptools'
    # editable finder maps a package to a folder only through its __init__.py, and fails to import fastbon.kernels
    # from a folder without one. Instead python/fastbon/kernels/__init__.py is a small regular package whose
    # __path__ also lists the top-level folder in a source checkout (editable installs), and BuildPyWithKernels
    # copies kernels/*.py beside it in wheels (and lists them for sdists). No sys.modules swap. See docs/backends.md.
    package_dir={"fastbon": "python/fastbon"},
    package_data={"fastbon.models": ["*/*.json", "*/*.safetensors", "*/*.txt"]},
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithKernels, **cmdclass},
)
