// CUDA kernels of pyevo::shared_group_norm_silu and pyevo::population_group_norm_silu
// (kernels/group_norm_silu.cu).
//  * forward: one block per (sample, group) slab; statistics, then normalise + SiLU. The
//    population op runs every input's slabs in ONE launch (a descriptor table per input).
//  * backward: one fused kernel per slab: the statistics, then per-channel sums of dz and
//    dz * xhat (deterministic, no atomics), then one elementwise pass for grad_input; the
//    per-sample affine gradients are summed over the batch with at::sum. Groups wider than the
//    kernel's shared memory allows (more than ~2,500 channels per group) use the ATen composite
//    shared_group_norm_silu_backward_composite instead.
#include <ATen/ATen.h>
// The c10 stream and guard headers, not ATen/cuda/CUDAContext.h: that one needs the cuBLAS and
// cuSPARSE headers, which a bare CUDA toolkit (like the build machine's) lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "composite_kernels.h"
#include "device_table.h"
#include "group_norm_runner.h"

namespace pyevo {
namespace {

group_norm_runner::TableUpload uploader(const at::Device& device) {
  return [device](const void* data, int64_t bytes) { return upload_table(data, bytes, device); };
}

at::Tensor shared_group_norm_silu_cuda(const at::Tensor& input, const at::Tensor& weight,
                                       const at::Tensor& bias, int64_t channels_per_group,
                                       double eps) {
  constexpr const char* op = "pyevo::shared_group_norm_silu";
  check_shared_group_norm_silu(input, weight, bias, channels_per_group, eps);
  check_on_cuda(input, op);
  const c10::cuda::CUDAGuard device_guard(input.device());
  return group_norm_runner::forward({input}, weight, bias, channels_per_group, eps,
                                    c10::cuda::getCurrentCUDAStream(), uploader(input.device()),
                                    op)
      .front();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_group_norm_silu_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, int64_t channels_per_group, double eps) {
  constexpr const char* op = "pyevo::shared_group_norm_silu_backward";
  check_shared_group_norm_silu_backward(grad_output, input, weight, bias, channels_per_group, eps);
  check_on_cuda(input, op);
  const c10::cuda::CUDAGuard device_guard(input.device());
  if (!group_norm_runner::backward_fits(input, channels_per_group)) {
    return shared_group_norm_silu_backward_composite(grad_output, input, weight, bias,
                                                     channels_per_group, eps);
  }
  return group_norm_runner::backward(grad_output, input, weight, bias, channels_per_group, eps,
                                     c10::cuda::getCurrentCUDAStream(), op);
}

std::vector<at::Tensor> population_group_norm_silu_cuda(at::TensorList inputs,
                                                        const at::Tensor& weight,
                                                        const at::Tensor& bias,
                                                        int64_t channels_per_group, double eps) {
  constexpr const char* op = "pyevo::population_group_norm_silu";
  check_population_group_norm_silu(inputs, weight, bias, channels_per_group, eps);
  check_on_cuda(weight, op);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  return group_norm_runner::forward(inputs.vec(), weight, bias, channels_per_group, eps,
                                    c10::cuda::getCurrentCUDAStream(), uploader(weight.device()),
                                    op);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyevo, CUDA, m) {
  m.impl("shared_group_norm_silu", &shared_group_norm_silu_cuda);
  m.impl("shared_group_norm_silu_backward", &shared_group_norm_silu_backward_cuda);
  m.impl("population_group_norm_silu", &population_group_norm_silu_cuda);
}

}  // namespace pyevo
