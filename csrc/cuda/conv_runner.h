// Torch-side glue of the implicit-GEMM convolutions (kernels/conv_igemm.h): builds the problem
// descriptors from tensors, allocates outputs and workspaces, and launches. Device-agnostic: the
// caller passes the stream and a function that copies the descriptor table to where the kernel
// reads it, so the same code serves the CUDA ops (csrc/cuda/shared_conv2d_cuda.cpp,
// csrc/cuda/population_cuda.cpp) and the host emulation of tests/cuda_emulation.
// Callers validate the arguments first (csrc/checks.h).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <climits>
#include <functional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "conv_igemm.h"
#include "new_output.h"

namespace pyevo {
namespace conv_runner {

// Copies `bytes` bytes of host memory to memory the kernels can read (device memory on a GPU);
// the returned tensor owns it and must live until the launch has been enqueued.
using TableUpload = std::function<at::Tensor(const void* data, int64_t bytes)>;

inline cuda::ConvDtype conv_dtype(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kFloat: return cuda::ConvDtype::kFloat32;
    case at::kDouble: return cuda::ConvDtype::kFloat64;
    case at::kHalf: return cuda::ConvDtype::kFloat16;
    case at::kBFloat16: return cuda::ConvDtype::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": CUDA supports float32, float64, float16 and bfloat16, got ", type);
  }
}

inline void check_status(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
}

inline void check_int32(int64_t value, const char* what, const char* op) {
  TORCH_CHECK(value <= INT_MAX, op, ": ", what, " = ", value,
              " is too large for the CUDA kernel (32-bit indexing)");
}

inline cuda::ConvShared shared_of(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  int64_t stride) {
  cuda::ConvShared shared{};
  shared.weight = weight.const_data_ptr();
  for (int d = 0; d < 4; ++d) shared.weight_stride[d] = weight.stride(d);
  shared.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  shared.bias_stride = bias.has_value() ? bias->stride(0) : 0;
  shared.stride = static_cast<int>(stride);
  return shared;
}

// One problem of the forward or grad_input pass: `input` read with its strides (its first
// `in_channels` channels), `grad_output` likewise (may be undefined for the forward).
inline cuda::ConvProblem problem_of(const at::Tensor& input, const at::Tensor& grad_output,
                                    const at::Tensor& weight, int64_t in_channels,
                                    int64_t out_channels, int64_t kernel_size, int64_t stride,
                                    const char* op) {
  cuda::ConvProblem p{};
  p.input = input.const_data_ptr();
  for (int d = 0; d < 4; ++d) p.input_stride[d] = input.stride(d);
  if (grad_output.defined()) {
    p.grad_output = grad_output.const_data_ptr();
    for (int d = 0; d < 4; ++d) p.grad_output_stride[d] = grad_output.stride(d);
  }
  const int64_t out_height = shared_conv2d_output_size(input.size(2), kernel_size, stride);
  const int64_t out_width = shared_conv2d_output_size(input.size(3), kernel_size, stride);
  check_int32(input.size(0) * input.size(2) * input.size(3), "batch * height * width", op);
  check_int32(input.size(0) * out_height * out_width, "batch * out_height * out_width", op);
  check_int32(std::max(in_channels, out_channels) * kernel_size * kernel_size,
              "channels * kernel_size^2", op);
  p.batch = static_cast<int>(input.size(0));
  p.in_channels = static_cast<int>(in_channels);
  p.height = static_cast<int>(input.size(2));
  p.width = static_cast<int>(input.size(3));
  p.out_channels = static_cast<int>(out_channels);
  p.out_height = static_cast<int>(out_height);
  p.out_width = static_cast<int>(out_width);
  p.kernel_size = static_cast<int>(kernel_size);
  p.crop_offset = static_cast<int>((weight.size(2) - kernel_size) / 2);
  return p;
}

// Runs `count` prepared problems (skipping none: the caller leaves out empty ones) in one launch.
inline void launch_problems(cuda::ConvPass pass, cuda::ConvDtype dtype, bool tf32,
                            const cuda::ConvShared& shared, std::vector<cuda::ConvProblem>& problems,
                            cudaStream_t stream, const TableUpload& upload, const char* op) {
  if (problems.empty()) return;
  const int count = static_cast<int>(problems.size());
  const int64_t tiles = cuda::prepare_conv_problems(pass, dtype, tf32, problems.data(), count);
  at::Tensor table;  // keeps the device copy alive until the launch is enqueued
  const cuda::ConvProblem* device_problems = nullptr;
  if (count > 1) {
    table = upload(problems.data(), static_cast<int64_t>(sizeof(cuda::ConvProblem)) * count);
    device_problems = static_cast<const cuda::ConvProblem*>(table.const_data_ptr());
  }
  check_status(cuda::launch_conv(pass, dtype, tf32, shared, problems.data(), device_problems,
                                 count, tiles, stream),
               op);
}

// The forward of K candidates: inputs has one tensor (shared by all) or K; candidate i reads the
// first in_channels[i] channels of its input (all of them when in_channels is empty).
inline std::vector<at::Tensor> conv_forward(const std::vector<at::Tensor>& inputs,
                                            const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            at::IntArrayRef in_channels,
                                            at::IntArrayRef out_channels,
                                            at::IntArrayRef kernel_sizes, int64_t stride, bool tf32,
                                            cudaStream_t stream, const TableUpload& upload,
                                            const char* op) {
  const size_t count = out_channels.size();
  const cuda::ConvDtype dtype = conv_dtype(weight.scalar_type(), op);
  std::vector<at::Tensor> outputs;
  std::vector<cuda::ConvProblem> problems;
  outputs.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& input = inputs.size() == 1 ? inputs[0] : inputs[i];
    const int64_t used_in = in_channels.empty() ? input.size(1) : in_channels[i];
    const int64_t k = kernel_sizes[i];
    at::Tensor output = new_output({input.size(0), out_channels[i],
                                    shared_conv2d_output_size(input.size(2), k, stride),
                                    shared_conv2d_output_size(input.size(3), k, stride)},
                                   input.options());
    if (output.numel() > 0) {
      cuda::ConvProblem p =
          problem_of(input, at::Tensor(), weight, used_in, out_channels[i], k, stride, op);
      p.output = output.mutable_data_ptr();
      problems.push_back(p);
    }
    outputs.push_back(std::move(output));
  }
  launch_problems(cuda::ConvPass::kForward, dtype, tf32, shared_of(weight, bias, stride), problems,
                  stream, upload, op);
  return outputs;
}

// shared_conv2d_backward. grad_input and grad_weight from our kernels, grad_bias from at::sum.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t out_channels, int64_t kernel_size,
    int64_t stride, std::array<bool, 3> output_mask, bool tf32, cudaStream_t stream,
    const char* op) {
  const cuda::ConvDtype dtype = conv_dtype(weight.scalar_type(), op);
  const at::Tensor absent = at::empty({0}, input.options());
  const cuda::ConvShared shared = shared_of(weight, std::nullopt, stride);
  const bool empty = grad_output.numel() == 0 || input.numel() == 0;
  cuda::ConvProblem p{};
  if (!empty) {
    p = problem_of(input, grad_output, weight, input.size(1), out_channels, kernel_size, stride,
                   op);
  }

  at::Tensor grad_input = absent;
  if (output_mask[0]) {
    grad_input = new_output(input.sizes(), input.options());
    if (empty) {
      grad_input.zero_();
    } else {
      std::vector<cuda::ConvProblem> problems = {p};
      problems[0].output = grad_input.mutable_data_ptr();
      launch_problems(cuda::ConvPass::kGradInput, dtype, tf32, shared, problems, stream,
                      TableUpload(), op);
    }
  }

  at::Tensor grad_weight = absent;
  if (output_mask[1]) {
    grad_weight = at::zeros(weight.sizes(), weight.options());
    if (!empty) {
      const cuda::ConvGradWeightPlan plan = cuda::plan_conv_grad_weight(dtype, tf32, p);
      const at::ScalarType acc_type = dtype == cuda::ConvDtype::kFloat64 ? at::kDouble : at::kFloat;
      at::Tensor workspace =
          new_output({plan.workspace_elements}, input.options().dtype(acc_type));
      const std::array<int64_t, 4> strides = {grad_weight.stride(0), grad_weight.stride(1),
                                              grad_weight.stride(2), grad_weight.stride(3)};
      check_status(cuda::launch_conv_grad_weight(dtype, tf32, shared, p, plan,
                                                 workspace.mutable_data_ptr(),
                                                 grad_weight.mutable_data_ptr(), strides.data(),
                                                 stream),
                   op);
    }
  }

  at::Tensor grad_bias = absent;
  if (output_mask[2] && bias.has_value()) {
    grad_bias = at::zeros(bias->sizes(), bias->options());
    if (grad_output.numel() > 0) {
      grad_bias.narrow(0, 0, out_channels).copy_(grad_output.sum({0, 2, 3}));
    }
  }
  return {std::move(grad_input), std::move(grad_weight), std::move(grad_bias)};
}

}  // namespace conv_runner
}  // namespace pyevo
