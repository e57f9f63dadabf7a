// CUDA kernels of pyevo::shared_conv2d (forward, backward) and pyevo::population_conv2d: our
// implicit-GEMM kernels (kernels/conv_igemm.cu), which read the weight crop in place.
//  * forward and grad_input: tensor cores for float16/bfloat16; for float32 tf32 tensor cores
//    when torch.backends.cudnn.allow_tf32 is set (PyTorch's default for convolutions, so a float32
//    conv here is as precise as cuDNN's), plain FMAs otherwise; float64 FMAs.
//  * grad_weight: the same kernel over the batch x pixels reduction, split for parallelism into
//    float partial sums that a second kernel adds in a fixed order (deterministic) into the crop
//    of a zeroed full-shape gradient. grad_bias: at::sum of grad_output.
//  * population_conv2d: every candidate (own input or a shared one; own C_in, C_out, k) in ONE
//    launch: a grouped implicit GEMM whose blocks find their candidate in a descriptor table.
// They run only when pyevo.ops.set_cuda_kernels("pyevo") chose them: by default ("auto") these
// ops run ATen's convolution (cuDNN) on the weight view, the CPU path's composites, which were
// 1.5-9x faster than these kernels in bfloat16 and mostly faster in float32 on an H100
// (experiments/device/README.md, 2026-11-26).
#include <ATen/ATen.h>
#include <ATen/Context.h>
// The c10 stream and guard headers, not ATen/cuda/CUDAContext.h: that one needs the cuBLAS and
// cuSPARSE headers, which a bare CUDA toolkit (like the build machine's) lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "composite_kernels.h"
#include "conv_runner.h"
#include "cuda_kernel_choice.h"
#include "device_table.h"

namespace pyevo {
namespace {

bool tf32_allowed() { return at::globalContext().allowTF32CuDNN(); }

conv_runner::TableUpload uploader(const at::Device& device) {
  return [device](const void* data, int64_t bytes) { return upload_table(data, bytes, device); };
}

void check_on_cuda(const at::Tensor& tensor, const char* op) {
  TORCH_CHECK(tensor.is_cuda(), op, ": the CUDA kernel got a tensor on ", tensor.device());
}

at::Tensor shared_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t out_channels,
                              int64_t kernel_size, int64_t stride) {
  constexpr const char* op = "pyevo::shared_conv2d";
  check_on_cuda(input, op);
  if (cuda_kernels() == CudaKernels::kAuto) {
    return shared_conv2d_composite(input, weight, bias, out_channels, kernel_size, stride);
  }
  check_shared_conv2d(input, weight, bias, out_channels, kernel_size, stride);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const std::vector<int64_t> out = {out_channels}, kernel = {kernel_size};
  return conv_runner::conv_forward({input}, weight, bias, {}, out, kernel, stride, tf32_allowed(),
                                   c10::cuda::getCurrentCUDAStream(), uploader(input.device()),
                                   op)
      .front();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t out_channels, int64_t kernel_size,
    int64_t stride, std::array<bool, 3> output_mask) {
  constexpr const char* op = "pyevo::shared_conv2d_backward";
  check_on_cuda(input, op);
  if (cuda_kernels() == CudaKernels::kAuto) {
    return shared_conv2d_backward_composite(grad_output, input, weight, bias, out_channels,
                                            kernel_size, stride, output_mask);
  }
  check_shared_conv2d_backward(grad_output, input, weight, bias, out_channels, kernel_size,
                               stride);
  const c10::cuda::CUDAGuard device_guard(input.device());
  return conv_runner::conv_backward(grad_output, input, weight, bias, out_channels, kernel_size,
                                    stride, output_mask, tf32_allowed(),
                                    c10::cuda::getCurrentCUDAStream(), op);
}

std::vector<at::Tensor> population_conv2d_cuda(at::TensorList inputs, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               at::IntArrayRef in_channels,
                                               at::IntArrayRef out_channels,
                                               at::IntArrayRef kernel_sizes, int64_t stride) {
  constexpr const char* op = "pyevo::population_conv2d";
  check_on_cuda(weight, op);
  if (cuda_kernels() == CudaKernels::kAuto) {
    return population_conv2d_composite(inputs, weight, bias, in_channels, out_channels,
                                       kernel_sizes, stride);
  }
  check_population_conv2d(inputs, weight, bias, in_channels, out_channels, kernel_sizes, stride);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  return conv_runner::conv_forward(inputs.vec(), weight, bias, in_channels, out_channels,
                                   kernel_sizes, stride, tf32_allowed(),
                                   c10::cuda::getCurrentCUDAStream(), uploader(weight.device()),
                                   op);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyevo, CUDA, m) {
  m.impl("shared_conv2d", &shared_conv2d_cuda);
  m.impl("shared_conv2d_backward", &shared_conv2d_backward_cuda);
  m.impl("population_conv2d", &population_conv2d_cuda);
}

}  // namespace pyevo
