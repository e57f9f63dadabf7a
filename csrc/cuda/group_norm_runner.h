// Torch-side glue of the CUDA GroupNorm+SiLU kernels (kernels/group_norm_silu.h) for
// pyevo::shared_group_norm_silu (forward, backward) and pyevo::population_group_norm_silu.
// Device-agnostic: the caller passes the stream and the function that uploads the descriptor
// table, so the host emulation (tests/cuda_emulation) uses it too. Callers check arguments.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <climits>
#include <functional>
#include <tuple>
#include <vector>

#include "group_norm_silu.h"
#include "new_output.h"

namespace pyevo {
namespace group_norm_runner {

using TableUpload = std::function<at::Tensor(const void* data, int64_t bytes)>;

inline cuda::GroupNormSiluDtype kernel_dtype(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kFloat: return cuda::GroupNormSiluDtype::kFloat32;
    case at::kDouble: return cuda::GroupNormSiluDtype::kFloat64;
    case at::kHalf: return cuda::GroupNormSiluDtype::kFloat16;
    case at::kBFloat16: return cuda::GroupNormSiluDtype::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": CUDA supports float32, float64, float16 and bfloat16 inputs, got ",
                  type);
  }
}

struct Shape {
  int64_t batch, channels, spatial;
};

inline Shape shape_of(const at::Tensor& input, int64_t channels_per_group, const char* op) {
  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t spatial = batch * channels == 0 ? 0 : input.numel() / (batch * channels);
  // The kernels index within a slab with 32-bit ints and launch one block per slab.
  TORCH_CHECK(channels_per_group * spatial <= INT_MAX, op, ": a group of ", channels_per_group,
              " channels x ", spatial, " values is too large for the CUDA kernel");
  TORCH_CHECK(batch * (channels / channels_per_group) <= INT_MAX, op, ": ", batch, " x ",
              channels / channels_per_group, " groups is too many for the CUDA kernel");
  return {batch, channels, spatial};
}

// silu(group_norm(input_i)) for each input, one launch. Inputs are made contiguous first (the
// kernel reads slabs as contiguous runs).
inline std::vector<at::Tensor> forward(const std::vector<at::Tensor>& inputs,
                                       const at::Tensor& weight, const at::Tensor& bias,
                                       int64_t channels_per_group, double eps, cudaStream_t stream,
                                       const TableUpload& upload, const char* op) {
  const cuda::GroupNormSiluDtype dtype = kernel_dtype(weight.scalar_type(), op);
  int64_t widest = 0;
  for (const at::Tensor& input : inputs) widest = std::max(widest, input.size(1));
  const at::Tensor gamma = weight.narrow(0, 0, widest).contiguous();
  const at::Tensor beta = bias.narrow(0, 0, widest).contiguous();
  std::vector<at::Tensor> contiguous_inputs, outputs;
  std::vector<cuda::GroupNormSiluInput> problems;
  for (const at::Tensor& input : inputs) {
    at::Tensor output = new_output(input.sizes(), input.options());
    if (input.numel() > 0) {
      const Shape s = shape_of(input, channels_per_group, op);
      contiguous_inputs.push_back(input.contiguous());
      problems.push_back({contiguous_inputs.back().const_data_ptr(), output.mutable_data_ptr(),
                          s.batch, s.channels, s.spatial, 0});
    }
    outputs.push_back(std::move(output));
  }
  if (problems.empty()) return outputs;
  const int count = static_cast<int>(problems.size());
  const int64_t slabs =
      cuda::prepare_group_norm_silu_population(problems.data(), count, channels_per_group);
  at::Tensor table;
  const cuda::GroupNormSiluInput* device_problems = nullptr;
  if (count > 1) {
    table = upload(problems.data(), static_cast<int64_t>(sizeof(cuda::GroupNormSiluInput)) * count);
    device_problems = static_cast<const cuda::GroupNormSiluInput*>(table.const_data_ptr());
  }
  const cudaError_t status = cuda::launch_group_norm_silu_population(
      dtype, problems.data(), device_problems, count, slabs, gamma.const_data_ptr(),
      beta.const_data_ptr(), channels_per_group, eps, stream);
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
  return outputs;
}

// Whether the fused backward fits its shared memory (two accumulators per channel of a group and
// per warp part); wider groups use the ATen composite.
inline bool backward_fits(const at::Tensor& input, int64_t channels_per_group) {
  const int64_t bytes = (input.scalar_type() == at::kDouble ? 8 : 4) * 4 * std::max<int64_t>(
                                                                             channels_per_group, 16);
  return bytes <= 40 * 1024;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, int64_t channels_per_group, double eps, cudaStream_t stream,
    const char* op) {
  const cuda::GroupNormSiluDtype dtype = kernel_dtype(input.scalar_type(), op);
  at::Tensor grad_input = new_output(input.sizes(), input.options());
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::zeros(bias.sizes(), bias.options());
  if (input.numel() == 0) return {grad_input, grad_weight, grad_bias};
  const Shape s = shape_of(input, channels_per_group, op);
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const at::Tensor gamma = weight.narrow(0, 0, s.channels).contiguous();
  const at::Tensor beta = bias.narrow(0, 0, s.channels).contiguous();
  const at::ScalarType math_type = at::toOpMathType(input.scalar_type());
  at::Tensor grad_weight_partial =
      new_output({s.batch, s.channels}, input.options().dtype(math_type));
  at::Tensor grad_bias_partial = new_output({s.batch, s.channels}, input.options().dtype(math_type));
  const cudaError_t status = cuda::launch_group_norm_silu_backward(
      dtype, dy.const_data_ptr(), x.const_data_ptr(), gamma.const_data_ptr(), beta.const_data_ptr(),
      grad_input.mutable_data_ptr(), grad_weight_partial.mutable_data_ptr(),
      grad_bias_partial.mutable_data_ptr(), s.batch, s.channels, s.spatial, channels_per_group,
      eps, stream);
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
  // Only the first C entries were used; the rest of the shared parameters get zero gradient.
  grad_weight.narrow(0, 0, s.channels).copy_(grad_weight_partial.sum(0));
  grad_bias.narrow(0, 0, s.channels).copy_(grad_bias_partial.sum(0));
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace group_norm_runner
}  // namespace pyevo
