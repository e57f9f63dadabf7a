// CPU kernels of pyevo::shared_attention.
//  * forward: at::linear on prefix views of the shared projections and
//    at::scaled_dot_product_attention (csrc/composite_kernels.cpp); its `kernel` argument is
//    validated, there is nothing to choose between here.
//  * backward: recomputes the projections, then runs ATen's CPU flash-attention forward (for the
//    output and its log-sum-exp) and backward, which never materialise the attention matrix;
//    the chain rule through the projections is shared with the CUDA backward.
//  * population_attention: a loop over the forward, one candidate at a time.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "composite_kernels.h"
#include "cuda_kernel_choice.h"

namespace pyevo {
namespace {

AttentionCoreBackwardResult attention_core_backward_cpu_flash(const at::Tensor& grad_attended,
                                                             const at::Tensor& query,
                                                             const at::Tensor& key,
                                                             const at::Tensor& value) {
  // The flash kernels need non-empty sequences; the math version handles the degenerate cases.
  if (query.numel() == 0 || key.numel() == 0) {
    return attention_core_backward_math(grad_attended, query, key, value);
  }
  auto [attended, logsumexp] = at::_scaled_dot_product_flash_attention_for_cpu(query, key, value);
  auto [grad_query, grad_key, grad_value] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      grad_attended, query, key, value, attended, logsumexp, /*dropout_p=*/0.0,
      /*is_causal=*/false);
  return {grad_query, grad_key, grad_value, attended};
}

std::vector<at::Tensor> shared_attention_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& hidden_states,
    const std::optional<at::Tensor>& encoder_hidden_states, const at::Tensor& q_weight,
    const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight,
    const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, int64_t heads, int64_t head_dim) {
  return shared_attention_backward_with(&attention_core_backward_cpu_flash, grad_output,
                                        hidden_states, encoder_hidden_states, q_weight, q_bias,
                                        k_weight, k_bias, v_weight, v_bias, out_weight, out_bias,
                                        heads, head_dim);
}

// The population op on the CPU: a loop over the single op (the CUDA kernel's reference).
std::vector<at::Tensor> population_attention_cpu(
    at::TensorList hidden_states, const at::Tensor& q_weight,
    const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight,
    const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, at::IntArrayRef heads, int64_t head_dim) {
  check_population_attention(hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                             out_weight, out_bias, heads, head_dim);
  std::vector<at::Tensor> outputs;
  outputs.reserve(heads.size());
  for (size_t i = 0; i < heads.size(); ++i) {
    const at::Tensor& x = hidden_states.size() == 1 ? hidden_states[0] : hidden_states[i];
    outputs.push_back(shared_attention_composite(x, std::nullopt, q_weight, q_bias, k_weight,
                                                 k_bias, v_weight, v_bias, out_weight, out_bias,
                                                 heads[i], head_dim));
  }
  return outputs;
}

at::Tensor shared_attention_cpu(
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& encoder_hidden_states,
    const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight,
    const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, int64_t heads, int64_t head_dim,
    c10::string_view kernel) {
  kernel_request_from_name(std::string_view(kernel.data(), kernel.size()),
                           "pyevo::shared_attention");
  return shared_attention_composite(hidden_states, encoder_hidden_states, q_weight, q_bias,
                                    k_weight, k_bias, v_weight, v_bias, out_weight, out_bias,
                                    heads, head_dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyevo, CPU, m) {
  m.impl("shared_attention", &shared_attention_cpu);
  m.impl("shared_attention_backward", &shared_attention_backward_cpu);
  m.impl("population_attention", &population_attention_cpu);
}

}  // namespace pyevo
