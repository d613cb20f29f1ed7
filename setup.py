"""Packaging: python/fastbon is the package, kernels/ installs as fastbon.kernels, csrc/ builds fastbon._C.

The extension builds with torch's cpp_extension against the torch already installed, so install with
``pip install --no-build-isolation -e ".[test]"`` (or ``pip install --no-build-isolation .``). Without an importable
torch the package installs without the extension and runs on its torch/triton backends.

Environment:
  FASTBON_BUILD_CUDA=0/1   build the CUDA kernels (default: when torch has CUDA and nvcc is found)
  FASTBON_CUDA_ARCHS       CUDA architectures, e.g. "8.0;9.0a" (default: TORCH_CUDA_ARCH_LIST, then torch's choice)
  MAX_JOBS                 parallel compile jobs (default 2)
"""

import glob
import os
import warnings

from setuptools import setup


def _extension_build():
    """(ext_modules, cmdclass) for fastbon._C, or nothing when torch is not importable at build time."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("torch is not importable while building fastbon (pip install --no-build-isolation): "
                      "installing without the C++ extension fastbon._C", stacklevel=1)
        return [], {}
    import torch

    requested = os.environ.get("FASTBON_BUILD_CUDA")
    build_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None) if requested is None \
        else requested == "1"
    if os.environ.get("FASTBON_CUDA_ARCHS"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["FASTBON_CUDA_ARCHS"]
    os.environ.setdefault("MAX_JOBS", "2")

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings/ops.cpp"]
    # No -march: the kernels pick AVX-512 / AVX2 / baseline code at run time (csrc/cpu/kernel_utils.h).
    cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi"]
    options = dict(name="fastbon._C", extra_link_args=["-fopenmp"], define_macros=[])
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/bindings/cuda_ops.cpp"]
        options["define_macros"].append(("FASTBON_WITH_CUDA", None))
        options["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-DFASTBON_WITH_CUDA"]}
        extension = cpp_extension.CUDAExtension(sources=sources, **options)
    else:
        options["extra_compile_args"] = {"cxx": cxx_flags}
        extension = cpp_extension.CppExtension(sources=sources, **options)
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()

setup(
    packages=["fastbon", "fastbon.ops", "fastbon.kernels", "fastbon.models"],
    package_dir={"fastbon": "python/fastbon", "fastbon.kernels": "kernels"},
    package_data={"fastbon.models": ["*/*.json", "*/*.safetensors", "*/*.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
