// Device code of the fused softmax attention (launched by kernels/flash_attention.cu).
//
// One thread block per (query tile, head, sample x problem). The block walks the keys in tiles;
// for each it computes the scores of its queries, folds them into a running (max, sum) per query
// row ("online softmax": earlier partial outputs are rescaled by exp(old max - new max)), and
// accumulates the probabilities times the values. Scores never reach device memory. Exponentials
// are base 2 with the scale pre-multiplied by log2(e).
//
//  * flash_attention_wmma_kernel (float16/bfloat16): 4 warps, 64 queries (16 per warp), key tiles
//    of 64. Q K^T and P V on tensor cores (WMMA 16x16x16, float accumulators). The queries stay
//    in WMMA fragments for the whole block; the partial output lives in shared memory (float),
//    where the per-row rescale can reach it. Head dims are padded to kD = 16, 32 or 64 with zeros.
//  * flash_attention_fma_kernel (float32): one thread per query row, 128 rows per block, the row's
//    query and output in registers, key/value tiles of 32 in shared memory (every thread reads the
//    same key: broadcast).
#pragma once

#include <mma.h>

#include <cstdint>

#include "flash_attention.h"
#include "numeric.cuh"

namespace pyevo {
namespace cuda {
namespace attention_detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

struct AttentionParams {
  AttentionProblem first;
  const AttentionProblem* table;
  int count;
  int batch;
  int head_dim;
  float scale_log2;  // scale * log2(e)
};

__device__ __forceinline__ const AttentionProblem& problem_of(const AttentionParams& params,
                                                             int index) {
  return index == 0 ? params.first : params.table[index];
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel
// ---------------------------------------------------------------------------------------------

constexpr int kWmmaQueries = 64;  // per block: 4 warps x 16
constexpr int kWmmaKeys = 64;     // per key tile
constexpr int kWmmaThreads = 128;

// Byte offsets of the regions of the WMMA kernel's dynamic shared memory.
template <typename T, int kD>
struct WmmaLayout {
  static constexpr int KV_LD = kD + 8;        // T elements, Ks / Vs / Qs rows
  static constexpr int S_LD = kWmmaKeys + 4;  // float, scores
  static constexpr int P_LD = kWmmaKeys + 8;  // T, probabilities
  static constexpr int O_LD = kD + 4;         // float, partial outputs
  static constexpr int K_OFFSET = 0;
  static constexpr int V_OFFSET = kWmmaKeys * KV_LD * static_cast<int>(sizeof(T));
  static constexpr int S_OFFSET = 2 * V_OFFSET;
  static constexpr int P_OFFSET = S_OFFSET + 4 * 16 * S_LD * 4;
  static constexpr int O_OFFSET = P_OFFSET + 4 * 16 * P_LD * static_cast<int>(sizeof(T));
  static constexpr int BYTES = O_OFFSET + 4 * 16 * O_LD * 4;
  static_assert(kWmmaQueries * KV_LD * sizeof(T) <= 4 * 16 * S_LD * 4, "Qs must fit the scores");
};

// Copies rows [row0, row0 + rows) of one head (columns [0, head_dim), zero beyond) of a
// (batch-strided, row-strided) tensor into shared memory [rows][ld], zero past `valid_rows`.
template <typename T, int kD, int kThreads>
__device__ __forceinline__ void load_head_tile(T* tile, int ld, const T* base, int64_t row_stride,
                                               int row0, int rows, int valid_rows, int head_dim) {
  const T zero = zero_value<T>();
  for (int e = threadIdx.x; e < rows * kD; e += kThreads) {
    const int r = e / kD, d = e - r * kD;
    const bool ok = row0 + r < valid_rows && d < head_dim;
    tile[r * ld + d] = ok ? base[(row0 + r) * row_stride + d] : zero;
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(kWmmaThreads)
    flash_attention_wmma_kernel(const __grid_constant__ AttentionParams params) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using L = WmmaLayout<T, kD>;
  const int problem_index = blockIdx.z / params.batch;
  const int b = blockIdx.z - problem_index * params.batch;
  const AttentionProblem& p = problem_of(params, problem_index);
  const int h = blockIdx.y;
  const int q0 = blockIdx.x * kWmmaQueries;
  if (h >= p.heads || q0 >= p.seq) return;  // the whole block leaves together

  PYEVO_DYNAMIC_SHARED(smem);
  T* Ks = reinterpret_cast<T*>(smem + L::K_OFFSET);
  T* Vs = reinterpret_cast<T*>(smem + L::V_OFFSET);
  T* Qs = reinterpret_cast<T*>(smem + L::S_OFFSET);  // aliases the scores, at first
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* Sw = reinterpret_cast<float*>(smem + L::S_OFFSET) + warp * 16 * L::S_LD;
  T* Pw = reinterpret_cast<T*>(smem + L::P_OFFSET) + warp * 16 * L::P_LD;
  float* Ow = reinterpret_cast<float*>(smem + L::O_OFFSET) + warp * 16 * L::O_LD;

  const int head_dim = params.head_dim;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * head_dim;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + h * head_dim;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + h * head_dim;

  // The queries of the block, then each warp's 16 rows into fragments for the whole block.
  load_head_tile<T, kD, kWmmaThreads>(Qs, L::KV_LD, q, p.q_row_stride, q0, kWmmaQueries, p.seq,
                                      head_dim);
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[kD / 16];
#pragma unroll
  for (int dd = 0; dd < kD / 16; ++dd) {
    wmma::load_matrix_sync(qf[dd], Qs + warp * 16 * L::KV_LD + dd * 16, L::KV_LD);
  }
  for (int e = lane; e < 16 * kD; e += 32) Ow[(e / kD) * L::O_LD + e % kD] = 0.0f;
  // Lanes 2r and 2r + 1 own row r of the warp's 16: columns [half * 32, half * 32 + 32) of a key
  // tile, and half of the row's output columns.
  const int row = lane / 2, half = lane % 2;
  float row_max = -INFINITY, row_sum = 0.0f;
  __syncthreads();  // every warp has its query fragments: the scores may overwrite Qs

  for (int kv0 = 0; kv0 < p.kv_seq; kv0 += kWmmaKeys) {
    load_head_tile<T, kD, kWmmaThreads>(Ks, L::KV_LD, k, p.k_row_stride, kv0, kWmmaKeys,
                                        p.kv_seq, head_dim);
    load_head_tile<T, kD, kWmmaThreads>(Vs, L::KV_LD, v, p.v_row_stride, kv0, kWmmaKeys,
                                        p.kv_seq, head_dim);
    __syncthreads();

    // Scores of the warp's 16 queries against the 64 keys.
#pragma unroll
    for (int j = 0; j < kWmmaKeys / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
      wmma::fill_fragment(s, 0.0f);
#pragma unroll
      for (int dd = 0; dd < kD / 16; ++dd) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
        wmma::load_matrix_sync(kf, Ks + j * 16 * L::KV_LD + dd * 16, L::KV_LD);
        wmma::mma_sync(s, qf[dd], kf, s);
      }
      wmma::store_matrix_sync(Sw + j * 16, s, L::S_LD, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of the row's 32 columns per lane, merged over the lane pair.
    const int valid = p.kv_seq - kv0;
    float tile_max = -INFINITY;
#pragma unroll 8
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      if (c < valid) tile_max = fmaxf(tile_max, Sw[row * L::S_LD + c] * params.scale_log2);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
    const float new_max = fmaxf(row_max, tile_max);
    const float alpha = exp2f(row_max - new_max);  // 0 on the first tile (row_max = -inf)
    float tile_sum = 0.0f;
#pragma unroll 8
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const float e = c < valid ? exp2f(Sw[row * L::S_LD + c] * params.scale_log2 - new_max) : 0.0f;
      const T rounded = Numeric<T>::from_acc(e);
      Pw[row * L::P_LD + c] = rounded;
      tile_sum += Numeric<T>::to_acc(rounded);  // the sum of what P V multiplies
    }
    tile_sum += __shfl_xor_sync(kFullMask, tile_sum, 1);
    row_sum = row_sum * alpha + tile_sum;
    row_max = new_max;
    for (int d = half * (kD / 2); d < (half + 1) * (kD / 2); ++d) Ow[row * L::O_LD + d] *= alpha;
    __syncwarp();

    // O += P V.
#pragma unroll
    for (int dd = 0; dd < kD / 16; ++dd) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
      wmma::load_matrix_sync(o, Ow + dd * 16, L::O_LD, wmma::mem_row_major);
#pragma unroll
      for (int j = 0; j < kWmmaKeys / 16; ++j) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
        wmma::load_matrix_sync(pf, Pw + j * 16, L::P_LD);
        wmma::load_matrix_sync(vf, Vs + j * 16 * L::KV_LD + dd * 16, L::KV_LD);
        wmma::mma_sync(o, pf, vf, o);
      }
      wmma::store_matrix_sync(Ow + dd * 16, o, L::O_LD, wmma::mem_row_major);
    }
    __syncwarp();
    __syncthreads();  // Ks / Vs are overwritten next
  }

  // Normalise and write the row's half of the output columns.
  const int query = q0 + warp * 16 + row;
  if (query < p.seq) {
    T* o = static_cast<T*>(p.o) + b * p.o_batch_stride + query * p.o_row_stride + h * head_dim;
    const float inverse = 1.0f / row_sum;
    for (int d = half * (kD / 2); d < (half + 1) * (kD / 2) && d < head_dim; ++d) {
      o[d] = Numeric<T>::from_acc(Ow[row * L::O_LD + d] * inverse);
    }
  }
#else
  __trap();  // the launcher picks this kernel only on compute capability >= 8.0
#endif
}

// ---------------------------------------------------------------------------------------------
// FMA kernel (float32)
// ---------------------------------------------------------------------------------------------

constexpr int kFmaQueries = 128;  // = threads per block
constexpr int kFmaKeys = 32;

template <int kD>
__global__ void __launch_bounds__(kFmaQueries)
    flash_attention_fma_kernel(const __grid_constant__ AttentionParams params) {
  const int problem_index = blockIdx.z / params.batch;
  const int b = blockIdx.z - problem_index * params.batch;
  const AttentionProblem& p = problem_of(params, problem_index);
  const int h = blockIdx.y;
  const int q0 = blockIdx.x * kFmaQueries;
  if (h >= p.heads || q0 >= p.seq) return;  // the whole block leaves together

  __shared__ float Ks[kFmaKeys][kD];
  __shared__ float Vs[kFmaKeys][kD];
  const int head_dim = params.head_dim;
  const float* q = static_cast<const float*>(p.q) + b * p.q_batch_stride + h * head_dim;
  const float* k = static_cast<const float*>(p.k) + b * p.k_batch_stride + h * head_dim;
  const float* v = static_cast<const float*>(p.v) + b * p.v_batch_stride + h * head_dim;

  const int query = q0 + threadIdx.x;
  float qr[kD], acc[kD];
#pragma unroll
  for (int d = 0; d < kD; ++d) {
    // The scale folded into the query: one multiply per value instead of one per score.
    qr[d] = query < p.seq && d < head_dim ? q[query * p.q_row_stride + d] * params.scale_log2 : 0.0f;
    acc[d] = 0.0f;
  }
  float row_max = -INFINITY, row_sum = 0.0f;
  for (int kv0 = 0; kv0 < p.kv_seq; kv0 += kFmaKeys) {
    for (int e = threadIdx.x; e < kFmaKeys * kD; e += kFmaQueries) {
      const int r = e / kD, d = e - r * kD;
      const bool ok = kv0 + r < p.kv_seq && d < head_dim;
      Ks[r][d] = ok ? k[(kv0 + r) * p.k_row_stride + d] : 0.0f;
      Vs[r][d] = ok ? v[(kv0 + r) * p.v_row_stride + d] : 0.0f;
    }
    __syncthreads();
    const int valid = p.kv_seq - kv0 < kFmaKeys ? p.kv_seq - kv0 : kFmaKeys;
    float scores[kFmaKeys];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kFmaKeys; ++j) {
      float s = 0.0f;
#pragma unroll
      for (int d = 0; d < kD; ++d) s = fmaf(qr[d], Ks[j][d], s);
      scores[j] = j < valid ? s : -INFINITY;
      tile_max = fmaxf(tile_max, scores[j]);
    }
    const float new_max = fmaxf(row_max, tile_max);
    const float alpha = exp2f(row_max - new_max);
    row_sum *= alpha;
#pragma unroll
    for (int d = 0; d < kD; ++d) acc[d] *= alpha;
#pragma unroll
    for (int j = 0; j < kFmaKeys; ++j) {
      const float e = exp2f(scores[j] - new_max);  // 0 for the masked keys
      row_sum += e;
#pragma unroll
      for (int d = 0; d < kD; ++d) acc[d] = fmaf(e, Vs[j][d], acc[d]);
    }
    row_max = new_max;
    __syncthreads();
  }
  if (query < p.seq) {
    float* o = static_cast<float*>(p.o) + b * p.o_batch_stride + query * p.o_row_stride + h * head_dim;
    const float inverse = 1.0f / row_sum;
#pragma unroll
    for (int d = 0; d < kD; ++d) {
      if (d < head_dim) o[d] = acc[d] * inverse;
    }
  }
}

}  // namespace attention_detail
}  // namespace cuda
}  // namespace pyevo
