// CPU kernels of pyevo::shared_conv2d: ATen's convolution (oneDNN where it applies) run directly
// on the strided view of the shared weight, so the sub-kernel is never copied out by us.
// pyevo::population_conv2d on the CPU is a loop over that op, one candidate at a time
// (population_conv2d_composite). The CUDA kernels of these ops are the same composites
// (csrc/cuda/shared_conv2d_cuda.cpp).
// pyevo::fused_conv2d on the CPU is its composite too (fused_conv2d_composite): the convolution,
// then the epilogue (bias, temb, residual, scale) as ATen ops; the CUDA kernel's reference. Its
// `kernel` argument is validated; there is nothing to choose between here.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "composite_kernels.h"
#include "cuda_kernel_choice.h"

namespace pyevo {
namespace {

at::Tensor fused_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& temb,
                            const std::optional<at::Tensor>& residual, double scale,
                            int64_t out_channels, int64_t kernel_size, c10::string_view kernel) {
  kernel_request_from_name(std::string_view(kernel.data(), kernel.size()), "pyevo::fused_conv2d");
  return fused_conv2d_composite(input, weight, bias, temb, residual, scale, out_channels,
                                kernel_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyevo, CPU, m) {
  m.impl("shared_conv2d", &shared_conv2d_composite);
  m.impl("shared_conv2d_backward", &shared_conv2d_backward_composite);
  m.impl("population_conv2d", &population_conv2d_composite);
  m.impl("fused_conv2d", &fused_conv2d_cpu);
}

}  // namespace pyevo
