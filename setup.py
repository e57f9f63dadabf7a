"""Builds pyevo._C: the op schemas, CPU kernels and (when a CUDA torch and CUDA_HOME are there)
the CUDA kernels, as one torch C++/CUDA extension compiled with ninja.

Environment:
  USE_CUDA=0               build the CPU-only extension even where CUDA could be built
  FORCE_CUDA=1             build the CUDA kernels with no visible GPU (CI, build machines)
  TORCH_CUDA_ARCH_LIST     archs to compile for; 9.0 when unset and no GPU is visible
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("USE_CUDA", "1") == "0":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    # torch.utils.cpp_extension adds the C++ standard its headers need. -fno-trapping-math lets
    # GCC vectorise loops with comparisons/conversions in them (our kernels run with FP traps
    # masked, like all of torch); it changes no computed value.
    cxx_flags = ["-O3", "-fno-trapping-math"]
    macros = [("PYEVO_TORCH_VERSION", f'"{torch.__version__}"')]
    if not _want_cuda():
        sources = [s for s in sources if os.sep + "cuda" + os.sep not in s]
        return CppExtension("pyevo._C", sources, define_macros=macros,
                            include_dirs=[os.path.join(ROOT, "csrc")],
                            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]},
                            extra_link_args=["-fopenmp"])
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if not archs:  # a visible GPU and no list: torch builds for the visible cards
        archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                 for i in range(torch.cuda.device_count())}))
    sources += sorted(glob.glob(os.path.join("kernels", "*.cu")))
    macros += [("PYEVO_WITH_CUDA", None), ("PYEVO_CUDA_ARCHS", f'"{archs}"'),
               ("PYEVO_CUDA_VERSION", f'"{torch.version.cuda}"')]
    return CUDAExtension("pyevo._C", sources, define_macros=macros,
                         include_dirs=[os.path.join(ROOT, "kernels"), os.path.join(ROOT, "csrc")],
                         extra_compile_args={"cxx": cxx_flags + ["-fopenmp"],
                                             "nvcc": ["-O3", "--use_fast_math",
                                                      "-lineinfo"]},
                         extra_link_args=["-fopenmp"])


setup(
    name="pyevo",
    version="0.1.0",
    description="DiffNAS: block-wise distillation NAS that makes diffusers UNets smaller and faster",
    packages=find_packages(include=["pyevo", "pyevo.*"]),
    package_data={"pyevo": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
