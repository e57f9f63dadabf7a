// Host-side entry points of the fused softmax-attention kernels (kernels/flash_attention.cu)
// behind pyevo::shared_attention and pyevo::population_attention on CUDA. Plain pointers, no
// torch types; the torch glue is csrc/cuda/attention_runner.h.
//
// Layout: the projections' outputs as at::linear gives them, heads side by side:
// q[b, s, h * head_dim + d] at q + b * q_batch_stride + s * q_row_stride + h * head_dim + d, and
// the same for k, v (kv_seq rows) and the output o. The kernel computes, per (b, h),
// o = softmax(q k^T * scale) v without materialising the scores (online softmax over key tiles).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pyevo {
namespace cuda {

enum class AttentionDtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

struct AttentionProblem {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int64_t q_batch_stride, q_row_stride;
  int64_t k_batch_stride, k_row_stride;
  int64_t v_batch_stride, v_row_stride;
  int64_t o_batch_stride, o_row_stride;
  int heads;   // heads of this problem (output columns heads * head_dim)
  int seq;     // query rows
  int kv_seq;  // key/value rows (>= 1)
};

// Whether the fused kernel handles this dtype and head size: float16/bfloat16 (tensor cores,
// compute capability >= 8.0) and float32 (FMAs), head_dim 1..64. Others fall back to SDPA.
bool flash_attention_supported(AttentionDtype dtype, int64_t head_dim);

// All `count` problems in one launch; they share batch and head_dim. `device_problems` is a
// device copy of `problems` (nullptr when count == 1).
cudaError_t launch_flash_attention(AttentionDtype dtype, const AttentionProblem* problems,
                                   const AttentionProblem* device_problems, int count, int batch,
                                   int head_dim, double scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyevo
