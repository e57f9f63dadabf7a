// CUDA kernels of pyevo::shared_conv2d (forward, backward) and pyevo::population_conv2d: the ATen
// composites of the CPU path (csrc/composite_kernels.cpp), i.e. cuDNN on the strided view of the
// weight crop (nothing copied by us); the population op is a loop of those convolutions.
//
// pyevo had its own WMMA implicit-GEMM kernels for these ops. On an H100 (2026-11-26,
// experiments/device/README.md, figures in experiments/device/results/2026-11-26-h100.md) they
// reached about 4% of the bfloat16 tensor-core peak, and the population conv 0.12-0.46x a loop
// of cuDNN calls, so they only ran when asked for explicitly; they were removed (issue 15).
// Work sharing between candidates is done in Python instead (pyevo/search/population.py), and
// the one custom conv that can beat cuDNN, with a resnet's epilogue fused, is
// pyevo::fused_conv2d (csrc/cuda/fused_conv2d_cuda.cpp). These ops have one implementation, so
// no `kernel` argument.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "composite_kernels.h"

namespace pyevo {
namespace {

// The composites check their arguments (csrc/checks.h) before they run.
at::Tensor shared_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t out_channels,
                              int64_t kernel_size, int64_t stride) {
  check_on_cuda(input, "pyevo::shared_conv2d");
  return shared_conv2d_composite(input, weight, bias, out_channels, kernel_size, stride);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t out_channels, int64_t kernel_size,
    int64_t stride, std::array<bool, 3> output_mask) {
  check_on_cuda(input, "pyevo::shared_conv2d_backward");
  return shared_conv2d_backward_composite(grad_output, input, weight, bias, out_channels,
                                          kernel_size, stride, output_mask);
}

std::vector<at::Tensor> population_conv2d_cuda(at::TensorList inputs, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               at::IntArrayRef in_channels,
                                               at::IntArrayRef out_channels,
                                               at::IntArrayRef kernel_sizes, int64_t stride) {
  check_on_cuda(weight, "pyevo::population_conv2d");
  return population_conv2d_composite(inputs, weight, bias, in_channels, out_channels,
                                     kernel_sizes, stride);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyevo, CUDA, m) {
  m.impl("shared_conv2d", &shared_conv2d_cuda);
  m.impl("shared_conv2d_backward", &shared_conv2d_backward_cuda);
  m.impl("population_conv2d", &population_conv2d_cuda);
}

}  // namespace pyevo
