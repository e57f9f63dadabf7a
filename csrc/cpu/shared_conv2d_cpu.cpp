// CPU kernels of pyevo::shared_conv2d: ATen's convolution (oneDNN where it applies) run directly
// on the strided view of the shared weight, so the sub-kernel is never copied out by us.
// pyevo::population_conv2d on the CPU is a loop over that op, one candidate at a time: it is the
// reference of the CUDA population kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "composite_kernels.h"

namespace pyevo {
namespace {

std::vector<at::Tensor> population_conv2d_cpu(at::TensorList inputs, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              at::IntArrayRef in_channels,
                                              at::IntArrayRef out_channels,
                                              at::IntArrayRef kernel_sizes, int64_t stride) {
  check_population_conv2d(inputs, weight, bias, in_channels, out_channels, kernel_sizes, stride);
  std::vector<at::Tensor> outputs;
  outputs.reserve(out_channels.size());
  for (size_t i = 0; i < out_channels.size(); ++i) {
    const at::Tensor& input = inputs.size() == 1 ? inputs[0] : inputs[i];
    const at::Tensor used = in_channels.empty() ? input : input.narrow(1, 0, in_channels[i]);
    outputs.push_back(
        shared_conv2d_composite(used, weight, bias, out_channels[i], kernel_sizes[i], stride));
  }
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyevo, CPU, m) {
  m.impl("shared_conv2d", &shared_conv2d_composite);
  m.impl("shared_conv2d_backward", &shared_conv2d_backward_composite);
  m.impl("population_conv2d", &population_conv2d_cpu);
}

}  // namespace pyevo
