#include "composite_kernels.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cmath>

#include "checks.h"

namespace pyevo {

at::Tensor absent_gradient(const at::Tensor& like) { return at::empty({0}, like.options()); }

namespace {

// A zero tensor of the shared parameter's full shape whose used part is `used_gradient`.
// `used_part` selects that part from a tensor of the full shape.
template <typename SelectUsedPart>
at::Tensor scatter_into_full(const at::Tensor& shared, const at::Tensor& used_gradient,
                             SelectUsedPart used_part) {
  at::Tensor full = at::zeros(shared.sizes(), shared.options());
  used_part(full).copy_(used_gradient);
  return full;
}

at::Tensor prefix_rows(const at::Tensor& t, int64_t length) { return t.narrow(0, 0, length); }

std::optional<at::Tensor> prefix_rows(const std::optional<at::Tensor>& t, int64_t length) {
  if (!t.has_value()) return std::nullopt;
  return t->narrow(0, 0, length);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// shared_conv2d
// ---------------------------------------------------------------------------------------------

at::Tensor shared_conv2d_sub_weight(const at::Tensor& weight, int64_t in_channels,
                                    int64_t out_channels, int64_t kernel_size) {
  const int64_t offset = (weight.size(2) - kernel_size) / 2;
  return weight.narrow(0, 0, out_channels)
      .narrow(1, 0, in_channels)
      .narrow(2, offset, kernel_size)
      .narrow(3, offset, kernel_size);
}

at::Tensor shared_conv2d_composite(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, int64_t out_channels,
                                   int64_t kernel_size, int64_t stride) {
  check_shared_conv2d(input, weight, bias, out_channels, kernel_size, stride);
  const int64_t padding = kernel_size / 2;
  const at::Tensor output = at::convolution(
      input, shared_conv2d_sub_weight(weight, input.size(1), out_channels, kernel_size),
      prefix_rows(bias, out_channels), {stride, stride}, {padding, padding}, {1, 1},
      /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1);
  // A channels_last input makes ATen answer channels_last; the op promises contiguous outputs.
  return output.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_conv2d_backward_composite(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t out_channels, int64_t kernel_size,
    int64_t stride, std::array<bool, 3> output_mask) {
  check_shared_conv2d_backward(grad_output, input, weight, bias, out_channels, kernel_size,
                               stride);
  const int64_t in_channels = input.size(1);
  const int64_t padding = kernel_size / 2;
  const bool want_bias = output_mask[2] && bias.has_value();
  const std::array<int64_t, 1> bias_sizes = {out_channels};
  auto [grad_input, grad_sub_weight, grad_sub_bias] = at::convolution_backward(
      grad_output, input, shared_conv2d_sub_weight(weight, in_channels, out_channels, kernel_size),
      want_bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(),
      {stride, stride}, {padding, padding}, {1, 1}, /*transposed=*/false,
      /*output_padding=*/{0, 0}, /*groups=*/1, {output_mask[0], output_mask[1], want_bias});

  at::Tensor grad_weight =
      output_mask[1] ? scatter_into_full(weight, grad_sub_weight,
                                         [&](const at::Tensor& full) {
                                           return shared_conv2d_sub_weight(
                                               full, in_channels, out_channels, kernel_size);
                                         })
                     : absent_gradient(input);
  at::Tensor grad_bias =
      want_bias ? scatter_into_full(
                      *bias, grad_sub_bias,
                      [&](const at::Tensor& full) { return prefix_rows(full, out_channels); })
                : absent_gradient(input);
  return {output_mask[0] ? grad_input.contiguous() : absent_gradient(input),
          std::move(grad_weight), std::move(grad_bias)};
}

at::MemoryFormat fused_conv2d_memory_format(const at::Tensor& input) {
  return input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

at::Tensor fused_conv2d_composite(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& temb,
                                  const std::optional<at::Tensor>& residual, double scale,
                                  int64_t out_channels, int64_t kernel_size) {
  check_fused_conv2d(input, weight, bias, temb, residual, scale, out_channels, kernel_size);
  const int64_t padding = kernel_size / 2;
  // .contiguous(format) copies only where ATen answered in the other layout; the result is a
  // fresh tensor either way, so the epilogue may run in place on it.
  at::Tensor output =
      at::convolution(input,
                      shared_conv2d_sub_weight(weight, input.size(1), out_channels, kernel_size),
                      prefix_rows(bias, out_channels), {1, 1}, {padding, padding}, {1, 1},
                      /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1)
          .contiguous(fused_conv2d_memory_format(input));
  if (temb.has_value()) {
    output.add_(temb->narrow(1, 0, out_channels).unsqueeze(-1).unsqueeze(-1));
  }
  if (residual.has_value()) output.add_(*residual);
  if (scale != 1.0) output.mul_(scale);
  return output;
}

std::vector<at::Tensor> population_conv2d_composite(at::TensorList inputs, const at::Tensor& weight,
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

// ---------------------------------------------------------------------------------------------
// shared_attention
// ---------------------------------------------------------------------------------------------

namespace {

// (B, L, heads * head_dim) -> (B, heads, L, head_dim)
at::Tensor split_heads(const at::Tensor& t, int64_t heads, int64_t head_dim) {
  return t.reshape({t.size(0), t.size(1), heads, head_dim}).transpose(1, 2);
}

// (B, heads, L, head_dim) -> (B, L, heads * head_dim)
at::Tensor merge_heads(const at::Tensor& t) {
  return t.transpose(1, 2).reshape({t.size(0), t.size(2), t.size(1) * t.size(3)});
}

}  // namespace

at::Tensor shared_attention_composite(
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& encoder_hidden_states,
    const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight,
    const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, int64_t heads, int64_t head_dim) {
  check_shared_attention(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias,
                         v_weight, v_bias, out_weight, out_bias, heads, head_dim);
  const int64_t inner = heads * head_dim;
  const at::Tensor& kv_source =
      encoder_hidden_states.has_value() ? *encoder_hidden_states : hidden_states;
  // Row prefixes of the nn.Linear weights are contiguous; the column prefix of out_weight is a
  // strided view that BLAS reads through its leading dimension, so nothing is copied.
  const at::Tensor query =
      at::linear(hidden_states, prefix_rows(q_weight, inner), prefix_rows(q_bias, inner));
  const at::Tensor key = at::linear(kv_source, prefix_rows(k_weight, inner),
                                    prefix_rows(k_bias, inner));
  const at::Tensor value = at::linear(kv_source, prefix_rows(v_weight, inner),
                                      prefix_rows(v_bias, inner));
  const at::Tensor attended = at::scaled_dot_product_attention(
      split_heads(query, heads, head_dim), split_heads(key, heads, head_dim),
      split_heads(value, heads, head_dim));
  return at::linear(merge_heads(attended), out_weight.narrow(1, 0, inner), out_bias).contiguous();
}

AttentionCoreBackwardResult attention_core_backward_math(const at::Tensor& grad_attended,
                                                        const at::Tensor& query,
                                                        const at::Tensor& key,
                                                        const at::Tensor& value) {
  // The attention probabilities, materialised: (B, heads, S, S_kv). The scale is folded into
  // the (smaller) query instead of the scores.
  const double scale = 1.0 / std::sqrt(static_cast<double>(query.size(-1)));
  const at::Tensor scaled_query = query * scale;
  const at::Tensor probabilities = at::softmax(at::matmul(scaled_query, key.transpose(-2, -1)), -1);
  const at::Tensor grad_scores = at::_softmax_backward_data(
      at::matmul(grad_attended, value.transpose(-2, -1)), probabilities, -1,
      probabilities.scalar_type());
  return {at::matmul(grad_scores, key) * scale,
          at::matmul(grad_scores.transpose(-2, -1), scaled_query),
          at::matmul(probabilities.transpose(-2, -1), grad_attended),
          at::matmul(probabilities, value)};
}

std::vector<at::Tensor> shared_attention_backward_with(
    AttentionCoreBackward core_backward, const at::Tensor& grad_output,
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& encoder_hidden_states,
    const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,
    const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias,
    const at::Tensor& v_weight, const std::optional<at::Tensor>& v_bias,
    const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias, int64_t heads,
    int64_t head_dim) {
  check_shared_attention(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias,
                         v_weight, v_bias, out_weight, out_bias, heads, head_dim);
  constexpr const char* op = "pyevo::shared_attention_backward";
  TORCH_CHECK(grad_output.device() == hidden_states.device() &&
                  grad_output.scalar_type() == hidden_states.scalar_type(),
              op, ": grad_output (", grad_output.scalar_type(), " on ", grad_output.device(),
              ") must match hidden_states (", hidden_states.scalar_type(), " on ",
              hidden_states.device(), ")");
  TORCH_CHECK(grad_output.sizes() == hidden_states.sizes(), op, ": grad_output has shape ",
              grad_output.sizes(), " but hidden_states has shape ", hidden_states.sizes());

  const int64_t inner = heads * head_dim;
  const bool cross_attention = encoder_hidden_states.has_value();
  const at::Tensor& kv_source = cross_attention ? *encoder_hidden_states : hidden_states;
  const at::Tensor used_q_weight = prefix_rows(q_weight, inner);
  const at::Tensor used_k_weight = prefix_rows(k_weight, inner);
  const at::Tensor used_v_weight = prefix_rows(v_weight, inner);
  const at::Tensor used_out_weight = out_weight.narrow(1, 0, inner);

  // Recompute the projections (the forward saves only its inputs), split into heads.
  const at::Tensor query = split_heads(
      at::linear(hidden_states, used_q_weight, prefix_rows(q_bias, inner)), heads, head_dim);
  const at::Tensor key = split_heads(
      at::linear(kv_source, used_k_weight, prefix_rows(k_bias, inner)), heads, head_dim);
  const at::Tensor value = split_heads(
      at::linear(kv_source, used_v_weight, prefix_rows(v_bias, inner)), heads, head_dim);

  // Output projection: out = merged @ used_out_weight^T + out_bias, with merged the heads'
  // attention outputs side by side; the core backward recomputes them (merged is needed here).
  const at::Tensor grad_merged = at::matmul(grad_output, used_out_weight);  // (B, S, inner)
  auto [grad_query_heads, grad_key_heads, grad_value_heads, attended] =
      core_backward(split_heads(grad_merged, heads, head_dim), query, key, value);
  const at::Tensor merged = merge_heads(attended);
  const at::Tensor grad_used_out_weight =
      at::matmul(grad_output.reshape({-1, grad_output.size(2)}).t(), merged.reshape({-1, inner}));
  const at::Tensor grad_query = merge_heads(grad_query_heads);
  const at::Tensor grad_key = merge_heads(grad_key_heads);
  const at::Tensor grad_value = merge_heads(grad_value_heads);

  // Input projections: y = x @ W^T + b, so dW = dy^T x, db = sum(dy), dx = dy W.
  auto flat = [](const at::Tensor& t) { return t.reshape({-1, t.size(2)}); };
  auto weight_gradient = [&](const at::Tensor& shared, const at::Tensor& grad_projection,
                             const at::Tensor& projection_input) {
    return scatter_into_full(shared, at::matmul(flat(grad_projection).t(), flat(projection_input)),
                             [&](const at::Tensor& full) { return prefix_rows(full, inner); });
  };
  auto bias_gradient = [&](const std::optional<at::Tensor>& shared,
                           const at::Tensor& grad_projection) {
    if (!shared.has_value()) return absent_gradient(hidden_states);
    return scatter_into_full(*shared, grad_projection.sum(at::IntArrayRef{0, 1}),
                             [&](const at::Tensor& full) { return prefix_rows(full, inner); });
  };

  at::Tensor grad_hidden_states = at::matmul(grad_query, used_q_weight);
  const at::Tensor grad_kv_source =
      at::matmul(grad_key, used_k_weight) + at::matmul(grad_value, used_v_weight);
  at::Tensor grad_encoder_hidden_states = absent_gradient(hidden_states);
  if (cross_attention) {
    grad_encoder_hidden_states = grad_kv_source.contiguous();
  } else {
    grad_hidden_states = grad_hidden_states + grad_kv_source;
  }

  return {grad_hidden_states.contiguous(),
          std::move(grad_encoder_hidden_states),
          weight_gradient(q_weight, grad_query, hidden_states),
          bias_gradient(q_bias, grad_query),
          weight_gradient(k_weight, grad_key, kv_source),
          bias_gradient(k_bias, grad_key),
          weight_gradient(v_weight, grad_value, kv_source),
          bias_gradient(v_bias, grad_value),
          scatter_into_full(out_weight, grad_used_out_weight,
                            [&](const at::Tensor& full) { return full.narrow(1, 0, inner); }),
          out_bias.has_value() ? grad_output.sum(at::IntArrayRef{0, 1}) : absent_gradient(hidden_states)};
}

std::vector<at::Tensor> shared_attention_backward_composite(
    const at::Tensor& grad_output, const at::Tensor& hidden_states,
    const std::optional<at::Tensor>& encoder_hidden_states, const at::Tensor& q_weight,
    const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight,
    const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, int64_t heads, int64_t head_dim) {
  return shared_attention_backward_with(&attention_core_backward_math, grad_output,
                                        hidden_states, encoder_hidden_states, q_weight, q_bias,
                                        k_weight, k_bias, v_weight, v_bias, out_weight, out_bias,
                                        heads, head_dim);
}

// ---------------------------------------------------------------------------------------------
// shared_group_norm_silu
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_group_norm_silu_backward_composite(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, int64_t channels_per_group, double eps) {
  check_shared_group_norm_silu_backward(grad_output, input, weight, bias, channels_per_group, eps);
  const int64_t batch = input.size(0);
  const int64_t channels = input.size(1);
  const int64_t spatial = batch * channels == 0 ? 0 : input.numel() / (batch * channels);
  const int64_t groups = channels / channels_per_group;
  const at::Tensor x = input.contiguous();
  const at::Tensor used_weight = weight.narrow(0, 0, channels).contiguous();
  const at::Tensor used_bias = bias.narrow(0, 0, channels).contiguous();

  auto [normalized, mean, rstd] =
      at::native_group_norm(x, used_weight, used_bias, batch, channels, spatial, groups, eps);
  // d silu(y)/dy = s (1 + y (1 - s)) with s = sigmoid(y), evaluated in the op-math precision.
  const at::ScalarType math_type = at::toOpMathType(input.scalar_type());
  const at::Tensor y = normalized.to(math_type);
  const at::Tensor s = at::sigmoid(y);
  const at::Tensor grad_normalized =
      (grad_output.to(math_type) * s * (1 + y * (1 - s))).to(input.scalar_type()).contiguous();
  auto [grad_input, grad_used_weight, grad_used_bias] = at::native_group_norm_backward(
      grad_normalized, x, mean, rstd, used_weight, batch, channels, spatial, groups,
      {true, true, true});
  return {grad_input.contiguous(),
          scatter_into_full(weight, grad_used_weight,
                            [&](const at::Tensor& full) { return prefix_rows(full, channels); }),
          scatter_into_full(bias, grad_used_bias,
                            [&](const at::Tensor& full) { return prefix_rows(full, channels); })};
}

}  // namespace pyevo
