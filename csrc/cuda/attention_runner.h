// Torch-side glue of the fused attention (kernels/flash_attention.h) for pyevo::shared_attention
// and pyevo::population_attention: the projections run as at::linear on prefix views of the
// shared weights (row prefixes are contiguous; the column prefix of out_weight is read through its
// leading dimension, nothing is copied), the attention core runs in our kernel, heads side by
// side, no transposes. Device-agnostic: the caller passes the stream and the function that
// uploads the descriptor table, so the host emulation (tests/cuda_emulation) uses it too.
//
// Where the kernel does not apply (float64, head_dim > 64, float16/bfloat16 below compute
// capability 8.0) the core falls back to at::scaled_dot_product_attention, which picks the best
// backend it has (flash / cuDNN / memory-efficient / math).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <vector>

#include "flash_attention.h"
#include "new_output.h"

namespace pyevo {
namespace attention_runner {

using TableUpload = std::function<at::Tensor(const void* data, int64_t bytes)>;

inline cuda::AttentionDtype attention_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return cuda::AttentionDtype::kFloat32;
    case at::kHalf: return cuda::AttentionDtype::kFloat16;
    case at::kBFloat16: return cuda::AttentionDtype::kBFloat16;
    default: return cuda::AttentionDtype::kFloat64;  // anything else: the SDPA fallback
  }
}

inline bool kernel_applies(const at::Tensor& like, int64_t head_dim) {
  const at::ScalarType type = like.scalar_type();
  if (type != at::kFloat && type != at::kHalf && type != at::kBFloat16) return false;
  return cuda::flash_attention_supported(attention_dtype(type), head_dim);
}

inline at::Tensor prefix_rows(const at::Tensor& t, int64_t length) { return t.narrow(0, 0, length); }
inline std::optional<at::Tensor> prefix_rows(const std::optional<at::Tensor>& t, int64_t length) {
  if (!t.has_value()) return std::nullopt;
  return t->narrow(0, 0, length);
}

struct Projected {
  at::Tensor query, key, value;  // (B, L, heads * head_dim), contiguous
};

inline Projected project(const at::Tensor& hidden_states, const at::Tensor& kv_source,
                         const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias,
                         const at::Tensor& k_weight, const std::optional<at::Tensor>& k_bias,
                         const at::Tensor& v_weight, const std::optional<at::Tensor>& v_bias,
                         int64_t inner) {
  return {at::linear(hidden_states, prefix_rows(q_weight, inner), prefix_rows(q_bias, inner))
              .contiguous(),
          at::linear(kv_source, prefix_rows(k_weight, inner), prefix_rows(k_bias, inner))
              .contiguous(),
          at::linear(kv_source, prefix_rows(v_weight, inner), prefix_rows(v_bias, inner))
              .contiguous()};
}

inline cuda::AttentionProblem problem_of(const Projected& p, const at::Tensor& out,
                                         int64_t heads) {
  cuda::AttentionProblem problem{};
  problem.q = p.query.const_data_ptr();
  problem.k = p.key.const_data_ptr();
  problem.v = p.value.const_data_ptr();
  problem.o = out.mutable_data_ptr();
  problem.q_batch_stride = p.query.stride(0);
  problem.q_row_stride = p.query.stride(1);
  problem.k_batch_stride = p.key.stride(0);
  problem.k_row_stride = p.key.stride(1);
  problem.v_batch_stride = p.value.stride(0);
  problem.v_row_stride = p.value.stride(1);
  problem.o_batch_stride = out.stride(0);
  problem.o_row_stride = out.stride(1);
  problem.heads = static_cast<int>(heads);
  problem.seq = static_cast<int>(p.query.size(1));
  problem.kv_seq = static_cast<int>(p.key.size(1));
  return problem;
}

// softmax(q k^T / sqrt(head_dim)) v per head with SDPA, heads side by side in and out.
inline at::Tensor sdpa_core(const Projected& p, int64_t heads, int64_t head_dim) {
  auto split = [&](const at::Tensor& t) {
    return t.reshape({t.size(0), t.size(1), heads, head_dim}).transpose(1, 2);
  };
  const at::Tensor attended =
      at::scaled_dot_product_attention(split(p.query), split(p.key), split(p.value));
  return attended.transpose(1, 2).reshape({p.query.size(0), p.query.size(1), heads * head_dim});
}

// The attention cores of several projected problems sharing batch and head_dim: one launch of
// our kernel when it applies, else SDPA one by one. Returns (B, S_i, heads_i * head_dim) each.
inline std::vector<at::Tensor> attention_cores(const std::vector<Projected>& projected,
                                               const std::vector<int64_t>& heads,
                                               int64_t head_dim, cudaStream_t stream,
                                               const TableUpload& upload, const char* op) {
  std::vector<at::Tensor> outputs;
  const at::Tensor& like = projected.front().query;
  bool use_kernel = kernel_applies(like, head_dim);
  for (const Projected& p : projected) {
    // Degenerate sequences: SDPA handles them (no keys gives NaN rows there, as in PyTorch).
    use_kernel = use_kernel && p.query.size(1) > 0 && p.key.size(1) > 0 &&
                 p.query.size(1) <= INT32_MAX && p.key.size(1) <= INT32_MAX;
  }
  if (!use_kernel) {
    for (size_t i = 0; i < projected.size(); ++i) {
      outputs.push_back(sdpa_core(projected[i], heads[i], head_dim));
    }
    return outputs;
  }
  std::vector<cuda::AttentionProblem> problems;
  for (size_t i = 0; i < projected.size(); ++i) {
    const Projected& p = projected[i];
    at::Tensor out = new_output({p.query.size(0), p.query.size(1), heads[i] * head_dim},
                                p.query.options());
    problems.push_back(problem_of(p, out, heads[i]));
    outputs.push_back(std::move(out));
  }
  at::Tensor table;
  const cuda::AttentionProblem* device_problems = nullptr;
  if (problems.size() > 1) {
    table = upload(problems.data(),
                   static_cast<int64_t>(sizeof(cuda::AttentionProblem) * problems.size()));
    device_problems = static_cast<const cuda::AttentionProblem*>(table.const_data_ptr());
  }
  const cudaError_t status = cuda::launch_flash_attention(
      attention_dtype(like.scalar_type()), problems.data(), device_problems,
      static_cast<int>(problems.size()), static_cast<int>(like.size(0)),
      static_cast<int>(head_dim), 1.0 / std::sqrt(static_cast<double>(head_dim)), stream);
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
  return outputs;
}

// shared_attention's forward. Callers check the arguments first.
inline at::Tensor attention_forward(
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& encoder_hidden_states,
    const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight,
    const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, int64_t heads, int64_t head_dim,
    cudaStream_t stream, const char* op) {
  const int64_t inner = heads * head_dim;
  const at::Tensor& kv_source =
      encoder_hidden_states.has_value() ? *encoder_hidden_states : hidden_states;
  const std::vector<Projected> projected = {project(hidden_states, kv_source, q_weight, q_bias,
                                                    k_weight, k_bias, v_weight, v_bias, inner)};
  const at::Tensor attended =
      attention_cores(projected, {heads}, head_dim, stream, TableUpload(), op).front();
  return at::linear(attended, out_weight.narrow(1, 0, inner), out_bias).contiguous();
}

// population_attention's forward: candidate i keeps the first heads[i] heads.
//  * one shared input: the projections and the attention core run once, for the most heads any
//    candidate keeps (a head's output does not depend on the other heads); then one output
//    projection per distinct head count, on that prefix of the heads' outputs.
//  * one input per candidate (same batch): projections per candidate, all attention cores in one
//    launch, output projections per candidate.
inline std::vector<at::Tensor> population_attention_forward(
    const std::vector<at::Tensor>& hidden_states, const at::Tensor& q_weight,
    const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight,
    const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, at::IntArrayRef heads, int64_t head_dim,
    cudaStream_t stream, const TableUpload& upload, const char* op) {
  const size_t count = heads.size();
  std::vector<at::Tensor> outputs(count);
  if (hidden_states.size() == 1) {
    const at::Tensor& x = hidden_states.front();
    const int64_t most = *std::max_element(heads.begin(), heads.end());
    const std::vector<Projected> projected = {project(x, x, q_weight, q_bias, k_weight, k_bias,
                                                      v_weight, v_bias, most * head_dim)};
    const at::Tensor attended =
        attention_cores(projected, {most}, head_dim, stream, upload, op).front();
    // One output projection per distinct head count, on the prefix of the heads' outputs (one
    // rounding, as a single candidate's op has; the search space has at most two head counts).
    std::map<int64_t, at::Tensor> by_heads;
    for (const int64_t h : heads) {
      if (by_heads.count(h) == 0) {
        by_heads[h] = at::linear(attended.narrow(2, 0, h * head_dim),
                                 out_weight.narrow(1, 0, h * head_dim), out_bias);
      }
    }
    std::map<int64_t, bool> handed_out;
    for (size_t i = 0; i < count; ++i) {
      // Every output its own contiguous tensor: a second candidate with the same heads gets a copy.
      at::Tensor out = by_heads[heads[i]];
      outputs[i] = handed_out[heads[i]] ? out.clone(at::MemoryFormat::Contiguous) : out.contiguous();
      handed_out[heads[i]] = true;
    }
    return outputs;
  }
  std::vector<Projected> projected;
  std::vector<int64_t> head_counts(heads.begin(), heads.end());
  for (size_t i = 0; i < count; ++i) {
    projected.push_back(project(hidden_states[i], hidden_states[i], q_weight, q_bias, k_weight,
                                k_bias, v_weight, v_bias, heads[i] * head_dim));
  }
  const std::vector<at::Tensor> attended =
      attention_cores(projected, head_counts, head_dim, stream, upload, op);
  for (size_t i = 0; i < count; ++i) {
    outputs[i] = at::linear(attended[i], out_weight.narrow(1, 0, heads[i] * head_dim), out_bias)
                     .contiguous();
  }
  return outputs;
}

}  // namespace attention_runner
}  // namespace pyevo
