// The host emulation harness: the real CUDA launchers and kernels of the GroupNorm+SiLU and
// attention ops (kernels/group_norm_silu.cu, kernels/flash_attention.cu), compiled with g++
// against emulation.h (force-included), driven through the same torch-side glue as the CUDA ops
// (csrc/cuda/*_runner.h), on CPU tensors. Built by tests/test_cuda_emulation.py with
// torch.utils.cpp_extension.load. fused_conv2d's CUTLASS kernels are not emulated.
#include <torch/extension.h>

#include <cstring>

// The kernels and their launchers, as C++.
#include "flash_attention.cu"
#include "group_norm_silu.cu"

#include "attention_runner.h"
#include "group_norm_runner.h"

// ---- the CUDA runtime calls the launchers make, answered for an emulated Hopper (9.0)
extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  switch (attribute) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    default: *value = 0;
  }
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
}

namespace {

at::Tensor host_table(const void* data, int64_t bytes) {
  at::Tensor table = at::empty({bytes}, at::kByte);
  std::memcpy(table.mutable_data_ptr(), data, bytes);
  return table;
}

std::vector<at::Tensor> group_norm_silu_forward(const std::vector<at::Tensor>& inputs,
                                                const at::Tensor& weight, const at::Tensor& bias,
                                                int64_t channels_per_group, double eps) {
  return pyevo::group_norm_runner::forward(inputs, weight, bias, channels_per_group, eps, nullptr,
                                           &host_table, "emulated group_norm_silu");
}

std::vector<at::Tensor> group_norm_silu_backward(const at::Tensor& grad_output,
                                                 const at::Tensor& input, const at::Tensor& weight,
                                                 const at::Tensor& bias, int64_t channels_per_group,
                                                 double eps) {
  auto [gi, gw, gb] = pyevo::group_norm_runner::backward(grad_output, input, weight, bias,
                                                         channels_per_group, eps, nullptr,
                                                         "emulated group_norm_silu_backward");
  return {gi, gw, gb};
}

// The attention core alone: q, k, v (B, L, heads * head_dim), one problem per entry of `queries`
// (all in one launch).
std::vector<at::Tensor> attention_cores(const std::vector<at::Tensor>& queries,
                                        const std::vector<at::Tensor>& keys,
                                        const std::vector<at::Tensor>& values,
                                        std::vector<int64_t> heads, int64_t head_dim) {
  std::vector<pyevo::attention_runner::Projected> projected;
  for (size_t i = 0; i < queries.size(); ++i) {
    projected.push_back({queries[i].contiguous(), keys[i].contiguous(), values[i].contiguous()});
  }
  return pyevo::attention_runner::attention_cores(projected, heads, head_dim, nullptr, &host_table,
                                                  "emulated attention");
}

std::vector<at::Tensor> population_attention(
    const std::vector<at::Tensor>& hidden_states, const at::Tensor& q_weight,
    const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight,
    const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, std::vector<int64_t> heads, int64_t head_dim) {
  return pyevo::attention_runner::population_attention_forward(
      hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight, out_bias,
      heads, head_dim, nullptr, &host_table, "emulated population_attention");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_norm_silu_forward", &group_norm_silu_forward);
  m.def("group_norm_silu_backward", &group_norm_silu_backward);
  m.def("attention_cores", &attention_cores);
  m.def("population_attention", &population_attention);
}
