// Device-generic implementations built from ATen calls. They serve as the CPU and CUDA kernels of
// shared_conv2d and population_conv2d and of the shared_attention forward (ATen picks oneDNN /
// cuDNN / the fused SDPA kernels), as the CUDA backward of shared_attention (the CPU one plugs
// ATen's CPU flash kernels into shared_attention_backward_with), and as the CUDA backward of
// shared_group_norm_silu until it has its own kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace pyevo {

// weight[:out_channels, :in_channels, c:c+k, c:c+k] with c = (K - k) / 2, as a strided view.
at::Tensor shared_conv2d_sub_weight(const at::Tensor& weight, int64_t in_channels,
                                    int64_t out_channels, int64_t kernel_size);

at::Tensor shared_conv2d_composite(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, int64_t out_channels,
                                   int64_t kernel_size, int64_t stride);

std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_conv2d_backward_composite(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t out_channels, int64_t kernel_size,
    int64_t stride, std::array<bool, 3> output_mask);

// fused_conv2d's output layout: channels_last when the input is channels_last (and not also
// contiguous, as a tensor with one channel or one pixel is), contiguous otherwise. Dense either
// way; the fused CUDA kernel writes NHWC, so a channels_last network pays no transposes.
at::MemoryFormat fused_conv2d_memory_format(const at::Tensor& input);

// fused_conv2d from ATen calls: the convolution on the weight view (oneDNN / cuDNN), then the
// epilogue in place on its fresh output: + bias (inside the convolution), + temb[:, :C_out, None,
// None], + residual, * scale. The CPU kernel, and the CUDA kernel's fallback.
at::Tensor fused_conv2d_composite(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& temb,
                                  const std::optional<at::Tensor>& residual, double scale,
                                  int64_t out_channels, int64_t kernel_size);

// population_conv2d as a loop over shared_conv2d_composite, one candidate at a time.
std::vector<at::Tensor> population_conv2d_composite(at::TensorList inputs, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias,
                                                    at::IntArrayRef in_channels,
                                                    at::IntArrayRef out_channels,
                                                    at::IntArrayRef kernel_sizes, int64_t stride);

at::Tensor shared_attention_composite(
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& encoder_hidden_states,
    const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight,
    const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, int64_t heads, int64_t head_dim);

// The backward of attended = softmax(q k^T / sqrt(head_dim)) v, for (B, heads, L, head_dim)
// tensors: the gradients w.r.t. q, k and v, and `attended` itself (recomputed; the op's forward
// saves only its inputs).
struct AttentionCoreBackwardResult {
  at::Tensor grad_query;
  at::Tensor grad_key;
  at::Tensor grad_value;
  at::Tensor attended;
};
using AttentionCoreBackward = AttentionCoreBackwardResult (*)(const at::Tensor& grad_attended,
                                                              const at::Tensor& query,
                                                              const at::Tensor& key,
                                                              const at::Tensor& value);

// Device-generic: materialises the (B, heads, S, S_kv) attention probabilities.
AttentionCoreBackwardResult attention_core_backward_math(const at::Tensor& grad_attended,
                                                        const at::Tensor& query,
                                                        const at::Tensor& key,
                                                        const at::Tensor& value);

// shared_attention_backward with the given attention-core backward: recomputes the
// projections, runs `core_backward`, and applies the chain rule through the projections.
std::vector<at::Tensor> shared_attention_backward_with(
    AttentionCoreBackward core_backward, const at::Tensor& grad_output,
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& encoder_hidden_states,
    const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,
    const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias,
    const at::Tensor& v_weight, const std::optional<at::Tensor>& v_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias, int64_t heads,
    int64_t head_dim);

// shared_attention_backward_with(attention_core_backward_math, ...).
std::vector<at::Tensor> shared_attention_backward_composite(
    const at::Tensor& grad_output, const at::Tensor& hidden_states,
    const std::optional<at::Tensor>& encoder_hidden_states, const at::Tensor& q_weight,
    const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight,
    const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, int64_t heads, int64_t head_dim);

// GroupNorm+SiLU backward from at::native_group_norm (recomputing the statistics) and
// at::native_group_norm_backward. Same contract as the pyevo::shared_group_norm_silu_backward op.
std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_group_norm_silu_backward_composite(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, int64_t channels_per_group, double eps);

// The (0,)-shaped placeholder that backward ops return for a gradient that does not exist or
// was not asked for.
at::Tensor absent_gradient(const at::Tensor& like);

}  // namespace pyevo
