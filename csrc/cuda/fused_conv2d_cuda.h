// Which kernel pyevo::fused_conv2d's CUDA kernel (csrc/cuda/fused_conv2d_cuda.cpp) runs for a
// call, for tests and benchmarks (pyevo._C._fused_conv2d_kernel).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "cuda_kernel_choice.h"

namespace pyevo {

// "cutlass_sm90" when the call with this `kernel` request would run the Hopper CUTLASS kernel,
// else "aten: <why not>" (the composite: cuDNN convolution + the epilogue as ATen ops). Validates
// the arguments like the op.
std::string fused_conv2d_cuda_kernel(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& temb,
                                     const std::optional<at::Tensor>& residual,
                                     int64_t out_channels, int64_t kernel_size,
                                     KernelRequest request);

}  // namespace pyevo
