// Input validation for the pyevo ops, shared by every device's kernels so that the CPU and CUDA
// implementations reject the same calls with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>

namespace pyevo {

// The CUDA kernels' first check: the op was dispatched to them with this tensor on a CUDA device.
inline void check_on_cuda(const at::Tensor& tensor, const char* op) {
  TORCH_CHECK(tensor.is_cuda(), op, ": the CUDA kernel got a tensor on ", tensor.device());
}

// shared_conv2d: input (N, C_in, H, W); weight (C_out_max, C_in_max, K, K) with K odd;
// C_in <= C_in_max; 1 <= out_channels <= C_out_max; kernel_size odd, <= K; stride >= 1;
// bias 1-D with at least out_channels entries.
void check_shared_conv2d(const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, int64_t out_channels,
                         int64_t kernel_size, int64_t stride);

// The forward checks plus grad_output == (N, out_channels, H_out, W_out) of the input's dtype
// and device.
void check_shared_conv2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  int64_t out_channels, int64_t kernel_size, int64_t stride);

// fused_conv2d: the shared_conv2d checks at stride 1, then temb (N, >= out_channels) and residual
// exactly (N, out_channels, H, W), each of the input's dtype and device; scale finite.
void check_fused_conv2d(const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& temb,
                        const std::optional<at::Tensor>& residual, double scale,
                        int64_t out_channels, int64_t kernel_size);

// shared_group_norm_silu: input (N, C, *spatial); C % channels_per_group == 0; weight and bias
// 1-D with at least C entries; eps >= 0.
void check_shared_group_norm_silu(const at::Tensor& input, const at::Tensor& weight,
                                  const at::Tensor& bias, int64_t channels_per_group, double eps);

void check_shared_group_norm_silu_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                           const at::Tensor& weight, const at::Tensor& bias,
                                           int64_t channels_per_group, double eps);

// shared_attention: hidden_states (B, S, C); encoder_hidden_states (B, S_kv, C_kv) or none;
// q_weight (>= heads*head_dim, C); k_weight, v_weight (>= heads*head_dim, C_kv);
// out_weight (C, >= heads*head_dim); q/k/v biases with >= heads*head_dim entries; out_bias (C).
void check_shared_attention(const at::Tensor& hidden_states,
                            const std::optional<at::Tensor>& encoder_hidden_states,
                            const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,
                            const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias,
                            const at::Tensor& v_weight, const std::optional<at::Tensor>& v_bias,
                            const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
                            int64_t heads, int64_t head_dim);

// Population ops (csrc/ops.cpp): the list arguments (one input or one per candidate; list
// lengths agree), then each candidate as its single op checks it; messages name the candidate.
void check_population_conv2d(at::TensorList inputs, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             at::IntArrayRef in_channels, at::IntArrayRef out_channels,
                             at::IntArrayRef kernel_sizes, int64_t stride);

void check_population_group_norm_silu(at::TensorList inputs, const at::Tensor& weight,
                                      const at::Tensor& bias, int64_t channels_per_group,
                                      double eps);

// Self-attention only; every candidate's input has the same batch size; heads[i] >= 1.
void check_population_attention(at::TensorList hidden_states, const at::Tensor& q_weight,
                                const std::optional<at::Tensor>& q_bias,
                                const at::Tensor& k_weight,
                                const std::optional<at::Tensor>& k_bias,
                                const at::Tensor& v_weight,
                                const std::optional<at::Tensor>& v_bias,
                                const at::Tensor& out_weight,
                                const std::optional<at::Tensor>& out_bias, at::IntArrayRef heads,
                                int64_t head_dim);

// Spatial output size of shared_conv2d along one dimension (padding kernel_size / 2).
inline int64_t shared_conv2d_output_size(int64_t input_size, int64_t kernel_size, int64_t stride) {
  return (input_size + 2 * (kernel_size / 2) - kernel_size) / stride + 1;
}

}  // namespace pyevo
