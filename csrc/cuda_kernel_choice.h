// Which implementation some CUDA ops use where ATen has a fast kernel of its own: ATen's (SDPA,
// cuDNN) or pyevo's (kernels/). Set from Python through pyevo.ops.set_cuda_kernels; read by the
// CUDA ops on every call. It concerns two ops:
//  * shared_attention (forward): kAuto runs SDPA, which was faster on an H100
//    (experiments/device/README.md, 2026-11-26); kPyevo the fused attention kernel;
//  * fused_conv2d: kAuto runs cuDNN and the epilogue as ATen ops until the CUTLASS kernel has
//    been measured faster; kPyevo that kernel where it applies.
// The other CUDA ops have one implementation each: pyevo's kernels for GroupNorm+SiLU and
// population_attention, ATen's convolution (cuDNN) for shared_conv2d and population_conv2d
// (pyevo's own conv kernels were removed: csrc/cuda/shared_conv2d_cuda.cpp says why).
// kAuto is the default; the CUDA tests and benchmarks set kPyevo.
#pragma once

#include <string>

namespace pyevo {

enum class CudaKernels { kAuto, kPyevo };

CudaKernels cuda_kernels();
void set_cuda_kernels(CudaKernels choice);

// "auto" / "pyevo" <-> the enum; an unknown name is a TORCH_CHECK error that lists the names.
CudaKernels cuda_kernels_from_name(const std::string& name);
std::string cuda_kernels_name(CudaKernels choice);

}  // namespace pyevo
