#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace pyevo {
namespace {

// Every tensor argument must live on the device of the op's main input and share its dtype.
void check_like(const char* op, const at::Tensor& reference, const char* reference_name,
                const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device() == reference.device(), op, ": ", name, " is on ", tensor.device(),
              " but ", reference_name, " is on ", reference.device(),
              "; all tensor arguments must be on the same device");
  TORCH_CHECK(tensor.scalar_type() == reference.scalar_type(), op, ": ", name, " has dtype ",
              tensor.scalar_type(), " but ", reference_name, " has dtype ",
              reference.scalar_type(), "; all tensor arguments must have the same dtype");
}

void check_floating(const char* op, const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(at::isFloatingType(tensor.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got dtype ", tensor.scalar_type());
}

void check_rank(const char* op, const at::Tensor& tensor, const char* name, int64_t rank,
                const char* layout) {
  TORCH_CHECK(tensor.dim() == rank, op, ": ", name, " must be ", rank, "-D ", layout, ", got ",
              tensor.dim(), "-D tensor of shape ", tensor.sizes());
}

void check_prefix_bias(const char* op, const at::Tensor& reference, const char* reference_name,
                       const std::optional<at::Tensor>& bias, const char* name,
                       int64_t used_length) {
  if (!bias.has_value()) return;
  check_like(op, reference, reference_name, *bias, name);
  check_rank(op, *bias, name, 1, "(length)");
  TORCH_CHECK(bias->size(0) >= used_length, op, ": ", name, " has ", bias->size(0),
              " entries but ", used_length, " are used");
}

}  // namespace

namespace {

void check_conv2d_as(const char* op, const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, int64_t out_channels,
                     int64_t kernel_size, int64_t stride) {
  check_rank(op, input, "input", 4, "(N, C_in, H, W)");
  check_rank(op, weight, "weight", 4, "(C_out_max, C_in_max, K, K)");
  check_floating(op, input, "input");
  check_like(op, input, "input", weight, "weight");
  const int64_t shared_kernel = weight.size(2);
  TORCH_CHECK(weight.size(3) == shared_kernel, op, ": weight must have a square kernel, got ",
              weight.size(2), "x", weight.size(3));
  TORCH_CHECK(shared_kernel % 2 == 1, op, ": the shared kernel size K must be odd (a centred ",
              "crop needs a centre), got K=", shared_kernel);
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, op,
              ": kernel_size must be odd and >= 1, got ", kernel_size);
  TORCH_CHECK(kernel_size <= shared_kernel, op, ": kernel_size ", kernel_size,
              " is larger than the shared weight's kernel ", shared_kernel);
  TORCH_CHECK(out_channels >= 1, op, ": out_channels must be >= 1, got ", out_channels);
  TORCH_CHECK(out_channels <= weight.size(0), op, ": out_channels ", out_channels,
              " is larger than the shared weight's ", weight.size(0), " output channels");
  TORCH_CHECK(input.size(1) >= 1, op, ": input has no channels");
  TORCH_CHECK(input.size(1) <= weight.size(1), op, ": input has ", input.size(1),
              " channels but the shared weight has only ", weight.size(1), " input channels");
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(input.size(2) >= 1 && input.size(3) >= 1, op,
              ": input must have a non-empty spatial size, got ", input.sizes());
  check_prefix_bias(op, input, "input", bias, "bias", out_channels);
}

}  // namespace

void check_shared_conv2d(const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, int64_t out_channels,
                         int64_t kernel_size, int64_t stride) {
  check_conv2d_as("pyevo::shared_conv2d", input, weight, bias, out_channels, kernel_size, stride);
}

void check_shared_conv2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  int64_t out_channels, int64_t kernel_size, int64_t stride) {
  check_shared_conv2d(input, weight, bias, out_channels, kernel_size, stride);
  constexpr const char* op = "pyevo::shared_conv2d_backward";
  check_like(op, input, "input", grad_output, "grad_output");
  const std::array<int64_t, 4> expected = {
      input.size(0), out_channels, shared_conv2d_output_size(input.size(2), kernel_size, stride),
      shared_conv2d_output_size(input.size(3), kernel_size, stride)};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), op, ": grad_output has shape ",
              grad_output.sizes(), " but the forward output has shape ", at::IntArrayRef(expected));
}

void check_fused_conv2d(const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& temb,
                        const std::optional<at::Tensor>& residual, double scale,
                        int64_t out_channels, int64_t kernel_size) {
  constexpr const char* op = "pyevo::fused_conv2d";
  check_conv2d_as(op, input, weight, bias, out_channels, kernel_size, /*stride=*/1);
  if (temb.has_value()) {
    check_like(op, input, "input", *temb, "temb");
    check_rank(op, *temb, "temb", 2, "(N, >= out_channels)");
    TORCH_CHECK(temb->size(0) == input.size(0), op, ": temb has batch size ", temb->size(0),
                " but input has ", input.size(0));
    TORCH_CHECK(temb->size(1) >= out_channels, op, ": temb has ", temb->size(1),
                " channels but out_channels is ", out_channels);
  }
  if (residual.has_value()) {
    check_like(op, input, "input", *residual, "residual");
    // Stride 1 with padding k // 2 keeps the spatial size.
    const std::array<int64_t, 4> expected = {input.size(0), out_channels, input.size(2),
                                             input.size(3)};
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(expected), op, ": residual has shape ",
                residual->sizes(), " but the convolution's output has shape ",
                at::IntArrayRef(expected));
  }
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

namespace {

void check_group_norm_silu_as(const char* op, const at::Tensor& input, const at::Tensor& weight,
                              const at::Tensor& bias, int64_t channels_per_group, double eps) {
  TORCH_CHECK(input.dim() >= 2, op, ": input must be (N, C, *spatial) with at least 2 dims, got ",
              input.dim(), "-D tensor of shape ", input.sizes());
  check_floating(op, input, "input");
  check_like(op, input, "input", weight, "weight");
  check_like(op, input, "input", bias, "bias");
  check_rank(op, weight, "weight", 1, "(length >= C)");
  check_rank(op, bias, "bias", 1, "(length >= C)");
  const int64_t channels = input.size(1);
  TORCH_CHECK(channels >= 1, op, ": input has no channels");
  TORCH_CHECK(channels_per_group >= 1, op, ": channels_per_group must be >= 1, got ",
              channels_per_group);
  TORCH_CHECK(channels % channels_per_group == 0, op, ": the input's ", channels,
              " channels are not divisible by channels_per_group=", channels_per_group);
  TORCH_CHECK(weight.size(0) >= channels, op, ": weight has ", weight.size(0),
              " entries but the input has ", channels, " channels");
  TORCH_CHECK(bias.size(0) >= channels, op, ": bias has ", bias.size(0),
              " entries but the input has ", channels, " channels");
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
}

}  // namespace

void check_shared_group_norm_silu(const at::Tensor& input, const at::Tensor& weight,
                                  const at::Tensor& bias, int64_t channels_per_group, double eps) {
  check_group_norm_silu_as("pyevo::shared_group_norm_silu", input, weight, bias,
                           channels_per_group, eps);
}

void check_shared_group_norm_silu_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                           const at::Tensor& weight, const at::Tensor& bias,
                                           int64_t channels_per_group, double eps) {
  check_shared_group_norm_silu(input, weight, bias, channels_per_group, eps);
  constexpr const char* op = "pyevo::shared_group_norm_silu_backward";
  check_like(op, input, "input", grad_output, "grad_output");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), op, ": grad_output has shape ",
              grad_output.sizes(), " but input has shape ", input.sizes());
}

namespace {

void check_attention_as(const char* op, const at::Tensor& hidden_states,
                        const std::optional<at::Tensor>& encoder_hidden_states,
                        const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,
                        const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias,
                        const at::Tensor& v_weight, const std::optional<at::Tensor>& v_bias,
                        const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
                        int64_t heads, int64_t head_dim) {
  check_rank(op, hidden_states, "hidden_states", 3, "(B, S, C)");
  check_floating(op, hidden_states, "hidden_states");
  TORCH_CHECK(heads >= 1, op, ": heads must be >= 1, got ", heads);
  TORCH_CHECK(head_dim >= 1, op, ": head_dim must be >= 1, got ", head_dim);
  const int64_t inner = heads * head_dim;
  const int64_t channels = hidden_states.size(2);

  const at::Tensor& kv_source =
      encoder_hidden_states.has_value() ? *encoder_hidden_states : hidden_states;
  if (encoder_hidden_states.has_value()) {
    check_like(op, hidden_states, "hidden_states", kv_source, "encoder_hidden_states");
    check_rank(op, kv_source, "encoder_hidden_states", 3, "(B, S_kv, C_kv)");
    TORCH_CHECK(kv_source.size(0) == hidden_states.size(0), op,
                ": encoder_hidden_states has batch size ", kv_source.size(0),
                " but hidden_states has ", hidden_states.size(0));
  }
  const int64_t kv_channels = kv_source.size(2);

  struct Projection {
    const at::Tensor& weight;
    const std::optional<at::Tensor>& bias;
    const char* weight_name;
    const char* bias_name;
    int64_t in_features;
  };
  const std::array<Projection, 3> projections = {
      Projection{q_weight, q_bias, "q_weight", "q_bias", channels},
      Projection{k_weight, k_bias, "k_weight", "k_bias", kv_channels},
      Projection{v_weight, v_bias, "v_weight", "v_bias", kv_channels}};
  for (const Projection& p : projections) {
    check_like(op, hidden_states, "hidden_states", p.weight, p.weight_name);
    check_rank(op, p.weight, p.weight_name, 2, "(H_max * head_dim, in_features)");
    TORCH_CHECK(p.weight.size(1) == p.in_features, op, ": ", p.weight_name, " has ",
                p.weight.size(1), " input features but its input has ", p.in_features,
                " channels");
    TORCH_CHECK(p.weight.size(0) >= inner, op, ": heads * head_dim = ", heads, " * ", head_dim,
                " = ", inner, " is larger than ", p.weight_name, "'s ", p.weight.size(0),
                " rows");
    check_prefix_bias(op, hidden_states, "hidden_states", p.bias, p.bias_name, inner);
  }

  check_like(op, hidden_states, "hidden_states", out_weight, "out_weight");
  check_rank(op, out_weight, "out_weight", 2, "(C, H_max * head_dim)");
  TORCH_CHECK(out_weight.size(0) == channels, op, ": out_weight has ", out_weight.size(0),
              " rows but hidden_states has ", channels, " channels");
  TORCH_CHECK(out_weight.size(1) >= inner, op, ": heads * head_dim = ", inner,
              " is larger than out_weight's ", out_weight.size(1), " columns");
  if (out_bias.has_value()) {
    check_prefix_bias(op, hidden_states, "hidden_states", out_bias, "out_bias", channels);
    TORCH_CHECK(out_bias->size(0) == channels, op, ": out_bias has ", out_bias->size(0),
                " entries but hidden_states has ", channels, " channels");
  }
}

}  // namespace

void check_shared_attention(const at::Tensor& hidden_states,
                            const std::optional<at::Tensor>& encoder_hidden_states,
                            const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,
                            const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias,
                            const at::Tensor& v_weight, const std::optional<at::Tensor>& v_bias,
                            const at::Tensor& out_weight, const std::optional<at::Tensor>& out_bias,
                            int64_t heads, int64_t head_dim) {
  check_attention_as("pyevo::shared_attention", hidden_states, encoder_hidden_states, q_weight,
                     q_bias, k_weight, k_bias, v_weight, v_bias, out_weight, out_bias, heads,
                     head_dim);
}

// ---------------------------------------------------------------------------------------------
// Population ops: the list arguments, then every candidate as its single op would check it (the
// message names the candidate).
// ---------------------------------------------------------------------------------------------

namespace {

std::string candidate_op(const char* op, size_t index) {
  return std::string(op) + " (candidate " + std::to_string(index) + ")";
}

void check_input_list(const char* op, const char* name, size_t inputs, size_t candidates) {
  TORCH_CHECK(candidates >= 1, op, ": no candidates (the per-candidate lists are empty)");
  TORCH_CHECK(inputs == 1 || inputs == candidates, op, ": ", name, " must hold one tensor "
              "(shared by every candidate) or one per candidate (", candidates, "), got ",
              inputs);
}

}  // namespace

void check_population_conv2d(at::TensorList inputs, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             at::IntArrayRef in_channels, at::IntArrayRef out_channels,
                             at::IntArrayRef kernel_sizes, int64_t stride) {
  constexpr const char* op = "pyevo::population_conv2d";
  const size_t count = out_channels.size();
  check_input_list(op, "inputs", inputs.size(), count);
  TORCH_CHECK(kernel_sizes.size() == count, op, ": kernel_sizes has ", kernel_sizes.size(),
              " entries but out_channels has ", count);
  TORCH_CHECK(in_channels.empty() || in_channels.size() == count, op, ": in_channels has ",
              in_channels.size(), " entries; give one per candidate (", count,
              ") or none (each candidate reads all its input's channels)");
  for (size_t i = 0; i < count; ++i) {
    const std::string who = candidate_op(op, i);
    const at::Tensor& input = inputs.size() == 1 ? inputs[0] : inputs[i];
    check_rank(who.c_str(), input, "input", 4, "(N, C, H, W)");
    at::Tensor used = input;
    if (!in_channels.empty()) {
      TORCH_CHECK(in_channels[i] >= 1 && in_channels[i] <= input.size(1), who,
                  ": in_channels must be in [1, ", input.size(1), "] (the input's channels), got ",
                  in_channels[i]);
      used = input.narrow(1, 0, in_channels[i]);
    }
    check_conv2d_as(who.c_str(), used, weight, bias, out_channels[i], kernel_sizes[i], stride);
  }
}

void check_population_group_norm_silu(at::TensorList inputs, const at::Tensor& weight,
                                      const at::Tensor& bias, int64_t channels_per_group,
                                      double eps) {
  constexpr const char* op = "pyevo::population_group_norm_silu";
  TORCH_CHECK(!inputs.empty(), op, ": no inputs");
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_group_norm_silu_as(candidate_op(op, i).c_str(), inputs[i], weight, bias,
                             channels_per_group, eps);
  }
}

void check_population_attention(at::TensorList hidden_states, const at::Tensor& q_weight,
                                const std::optional<at::Tensor>& q_bias,
                                const at::Tensor& k_weight,
                                const std::optional<at::Tensor>& k_bias,
                                const at::Tensor& v_weight,
                                const std::optional<at::Tensor>& v_bias,
                                const at::Tensor& out_weight,
                                const std::optional<at::Tensor>& out_bias, at::IntArrayRef heads,
                                int64_t head_dim) {
  constexpr const char* op = "pyevo::population_attention";
  const size_t count = heads.size();
  check_input_list(op, "hidden_states", hidden_states.size(), count);
  for (size_t i = 0; i < count; ++i) {
    const std::string who = candidate_op(op, i);
    const at::Tensor& x = hidden_states.size() == 1 ? hidden_states[0] : hidden_states[i];
    check_attention_as(who.c_str(), x, std::nullopt, q_weight, q_bias, k_weight, k_bias, v_weight,
                       v_bias, out_weight, out_bias, heads[i], head_dim);
    TORCH_CHECK(x.size(0) == hidden_states[0].size(0), who, ": hidden_states has batch size ",
                x.size(0), " but candidate 0's has ", hidden_states[0].size(0),
                "; every candidate's input must have the same batch size");
  }
}

}  // namespace pyevo
