"""Builds pyevo._C: the op schemas, CPU kernels and (when a CUDA torch and CUDA_HOME are there)
the CUDA kernels, as one torch C++/CUDA extension compiled with ninja.

Environment:
  USE_CUDA=0               build the CPU-only extension even where CUDA could be built
  FORCE_CUDA=1             build the CUDA kernels with no visible GPU (CI, build machines)
  TORCH_CUDA_ARCH_LIST     archs to compile for; 9.0 when unset and no GPU is visible

Hopper: where 9.0 is among the archs and the CUTLASS headers are installed (the PyPI package
nvidia-cutlass, found through its cutlass_library module; not in requirements.txt, which pins the
CPU venv), the fused convolution's CUTLASS kernels (kernels/fused_conv2d_sm90_*.cu) are built and
9.0 is compiled as sm_90a for the whole extension: their GMMA/TMA instructions exist only there,
and one cubin per device (not sm_90 beside sm_90a) leaves no doubt which one the driver loads.
Without CUTLASS the extension builds as before and fused_conv2d runs its composite on CUDA.
"""
import glob
import importlib.util
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


def _cutlass_include_dirs() -> list[str]:
    """The CUTLASS/CuTe include folders of the installed nvidia-cutlass wheel, [] without it. The
    wheel ships them as cutlass_library/source/include (cutlass/, cute/) and
    source/tools/util/include (cutlass/util/, which the conv collectives include). Located without
    importing cutlass_library (its import pulls in optional dependencies the build does not need)."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return []
    source = os.path.join(list(spec.submodule_search_locations)[0], "source")
    dirs = [os.path.join(source, "include"), os.path.join(source, "tools", "util", "include")]
    if not all(os.path.isfile(os.path.join(d, f)) for d, f in
               zip(dirs, ("cutlass/conv/kernel/conv_universal.hpp", "cutlass/util/packed_stride.hpp"))):
        return []
    return dirs


def _is_hopper(arch: str) -> bool:
    return arch.split("+")[0] in ("9.0", "9.0a")


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
    cu_sources = sorted(glob.glob(os.path.join("kernels", "*.cu")))
    cutlass_sources = [s for s in cu_sources if os.path.basename(s).startswith("fused_conv2d_sm90")]
    include_dirs = [os.path.join(ROOT, "kernels"), os.path.join(ROOT, "csrc")]
    arch_list = [a for a in archs.replace(" ", ";").split(";") if a]
    cutlass_dirs = _cutlass_include_dirs()
    if cutlass_dirs and any(_is_hopper(a) for a in arch_list):
        arch_list = [a.replace("9.0", "9.0a", 1) if _is_hopper(a) and "9.0a" not in a else a
                     for a in arch_list]
        archs = ";".join(arch_list)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch turns 9.0a into compute_90a / sm_90a
        include_dirs += cutlass_dirs
        macros.append(("PYEVO_WITH_CUTLASS_SM90", None))
    else:
        cu_sources = [s for s in cu_sources if s not in cutlass_sources]
    sources += cu_sources
    macros += [("PYEVO_WITH_CUDA", None), ("PYEVO_CUDA_ARCHS", f'"{archs}"'),
               ("PYEVO_CUDA_VERSION", f'"{torch.version.cuda}"')]
    return CUDAExtension("pyevo._C", sources, define_macros=macros,
                         include_dirs=include_dirs,
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
