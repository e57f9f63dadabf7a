// Which implementation the CUDA ops use where ATen has a fast kernel of its own: ATen's
// (cuDNN convolution, SDPA) or pyevo's (kernels/). Set from Python through
// pyevo.ops.set_cuda_kernels; read by the CUDA ops on every call.
//  * kAuto (the default): per op, whichever was faster on an H100 (experiments/device/README.md,
//    2026-11-26): ATen's for shared_conv2d, population_conv2d and the shared_attention forward;
//    pyevo's for shared_group_norm_silu, population_group_norm_silu and population_attention.
//  * kPyevo: pyevo's kernels wherever it has one (the CUDA tests and benchmarks use it).
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
