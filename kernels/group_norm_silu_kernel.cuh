// Device code of the CUDA GroupNorm+SiLU forward (one input, or the K inputs of
// pyevo::population_group_norm_silu in one launch) and backward; launched by
// kernels/group_norm_silu.cu. Kept apart from the launcher so it can be compiled on its own (the
// host emulation of tests/cuda_emulation does).
//
// One thread block per (sample, group) slab: channels_per_group * HxW contiguous values. The
// block reads its slab twice: once for the statistics, once to normalise and apply SiLU; the
// second read mostly hits L2. Loads and stores are 16-byte packs when the data is aligned and
// HxW is a multiple of the pack width (so a pack never straddles two channels), else scalar.
//
// Statistics: every thread folds its packs into a Welford state (mean, M2, count); a pack's own
// mean and M2 are exact two-pass values over its registers, merged with Chan's formula, so the
// per-value cost is two FMAs and the per-pack cost one division. Thread states are merged the
// same way across the warp (shuffles) and the block (shared memory). No E[x^2] - E[x]^2
// cancellation. Arithmetic is float for float32/float16/bfloat16, double for float64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "group_norm_silu.h"

// Dynamic shared memory, also under the host emulation of tests/cuda_emulation.
#ifdef PYEVO_HOST_EMULATION
#define PYEVO_GN_DYNAMIC_SHARED(name) unsigned char* name = ::pyevo_emulation::dynamic_smem()
#else
#define PYEVO_GN_DYNAMIC_SHARED(name)                              \
  extern __shared__ __align__(16) unsigned char name##_storage[]; \
  unsigned char* name = name##_storage
#endif

namespace pyevo {
namespace cuda {
namespace group_norm_silu_detail {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 512;
constexpr unsigned kFullWarpMask = 0xffffffffu;

template <typename T>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccumulateType<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_type<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float inverse_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double inverse_sqrt(double v) { return rsqrt(v); }

__device__ __forceinline__ float silu(float z) { return z / (1.0f + expf(-z)); }
__device__ __forceinline__ double silu(double z) { return z / (1.0 + exp(-z)); }

// kVec values loaded or stored as one access of kVec * sizeof(T) bytes.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T values[kVec];
};

// Running statistics of `count` values: their mean and M2 = sum of squared deviations.
template <typename acc_t>
struct WelfordState {
  acc_t mean;
  acc_t m2;
  acc_t count;
};

// Chan et al.'s parallel combination of two Welford states.
template <typename acc_t>
__device__ __forceinline__ WelfordState<acc_t> welford_merge(const WelfordState<acc_t>& a,
                                                            const WelfordState<acc_t>& b) {
  const acc_t count = a.count + b.count;
  if (count == acc_t(0)) return a;
  const acc_t share_of_b = b.count / count;
  const acc_t delta = b.mean - a.mean;
  return {a.mean + delta * share_of_b, a.m2 + b.m2 + delta * delta * a.count * share_of_b, count};
}

// After the loop lane 0 holds the merge of the whole warp (other lanes hold partial merges).
template <typename acc_t>
__device__ __forceinline__ WelfordState<acc_t> warp_merge(WelfordState<acc_t> state) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const WelfordState<acc_t> other = {__shfl_down_sync(kFullWarpMask, state.mean, offset),
                                       __shfl_down_sync(kFullWarpMask, state.m2, offset),
                                       __shfl_down_sync(kFullWarpMask, state.count, offset)};
    state = welford_merge(state, other);
  }
  return state;
}

// The merge of every thread's state, returned to every thread. blockDim.x must be a multiple of
// the warp size and at most kMaxThreads.
template <typename acc_t>
__device__ WelfordState<acc_t> block_merge(WelfordState<acc_t> state) {
  __shared__ WelfordState<acc_t> warp_states[kMaxThreads / kWarpSize];
  __shared__ WelfordState<acc_t> block_state;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  state = warp_merge(state);
  if (lane == 0) warp_states[warp] = state;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarpSize;
    state = lane < warps ? warp_states[lane] : WelfordState<acc_t>{0, 0, 0};
    state = warp_merge(state);
    if (lane == 0) block_state = state;
  }
  __syncthreads();
  return block_state;
}

// The statistics of one slab (packs of kVec values), merged over the block: every thread gets the
// slab's mean and 1 / sqrt(variance + eps).
template <typename T, int kVec>
__device__ __forceinline__ void slab_statistics(const Pack<T, kVec>* x, int packs, int slab_size,
                                                acc_type<T> eps, acc_type<T>& mean,
                                                acc_type<T>& rstd) {
  using acc_t = acc_type<T>;
  WelfordState<acc_t> state = {0, 0, 0};
  for (int p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<T, kVec> pack = x[p];
    acc_t values[kVec];
    acc_t pack_sum = 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      values[k] = to_acc(pack.values[k]);
      pack_sum += values[k];
    }
    const acc_t pack_mean = pack_sum / acc_t(kVec);
    acc_t pack_m2 = 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t deviation = values[k] - pack_mean;
      pack_m2 += deviation * deviation;
    }
    state = welford_merge(state, WelfordState<acc_t>{pack_mean, pack_m2, acc_t(kVec)});
  }
  const WelfordState<acc_t> stats = block_merge(state);
  mean = stats.mean;
  rstd = inverse_sqrt(stats.m2 / static_cast<acc_t>(slab_size) + eps);
}

// The inputs of a launch are GroupNormSiluInput (group_norm_silu.h): contiguous
// (batch, channels, spatial) tensors whose (sample, group) slabs are the blocks slab_begin ..
// slab_begin + batch * channels / channels_per_group - 1.
struct GroupNormParams {
  GroupNormSiluInput first;         // input 0 (the only one when count == 1)
  const GroupNormSiluInput* table;  // device copy of all inputs when count > 1
  int count;
  const void* weight;  // shared affine parameters, contiguous, >= every problem's channels
  const void* bias;
  int channels_per_group;
  double eps;
};

// Grid: one block per slab of every problem. A block finds its problem by binary search over the
// problems' first slabs, then normalises the slab (sample, group) and applies SiLU.
template <typename T, int kVec>
__global__ void group_norm_silu_forward_kernel(const __grid_constant__ GroupNormParams params) {
  using acc_t = acc_type<T>;
  using PackT = Pack<T, kVec>;
  const GroupNormSiluInput* problem = &params.first;
  int64_t slab = blockIdx.x;
  if (params.count > 1) {
    int lo = 0, hi = params.count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (params.table[mid].slab_begin <= slab) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    problem = params.table + lo;
  }
  slab -= problem->slab_begin;
  const int channels_per_group = params.channels_per_group;
  const int spatial = static_cast<int>(problem->spatial);
  const int groups = static_cast<int>(problem->channels) / channels_per_group;
  const int slab_size = channels_per_group * spatial;
  const int packs = slab_size / kVec;  // exact: spatial % kVec == 0 when kVec > 1
  const PackT* x = reinterpret_cast<const PackT*>(static_cast<const T*>(problem->input) +
                                                  slab * slab_size);
  PackT* y = reinterpret_cast<PackT*>(static_cast<T*>(problem->output) + slab * slab_size);
  const T* __restrict__ weight = static_cast<const T*>(params.weight);
  const T* __restrict__ bias = static_cast<const T*>(params.bias);

  acc_t mean, rstd;
  slab_statistics<T, kVec>(x, packs, slab_size, static_cast<acc_t>(params.eps), mean, rstd);

  const int first_channel = static_cast<int>(slab % groups) * channels_per_group;
  for (int p = threadIdx.x; p < packs; p += blockDim.x) {
    const int channel = first_channel + (p * kVec) / spatial;
    const acc_t scale = rstd * to_acc(weight[channel]);
    const acc_t shift = to_acc(bias[channel]);
    const PackT pack = x[p];
    PackT result;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      // (x - mean) * scale rather than x * scale - mean * scale: no cancellation when the mean
      // is large next to the spread.
      const acc_t z = (to_acc(pack.values[k]) - mean) * scale + shift;
      result.values[k] = from_acc<T>(silu(z));
    }
    y[p] = result;
  }
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }
__device__ __forceinline__ double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

// d silu(z) / dz = s (1 + z (1 - s)), s = sigmoid(z).
template <typename acc_t>
__device__ __forceinline__ acc_t silu_grad(acc_t z, acc_t grad) {
  const acc_t s = sigmoid(z);
  return grad * s * (acc_t(1) + z * (acc_t(1) - s));
}

// The backward of silu(group_norm(x)), one block per (sample, group) slab:
//  1. the slab's mean and rstd (as the forward);
//  2. per channel c: sum dz and sum dz * xhat, with dz = dL/d(pre-activation) and
//     xhat = (x - mean) * rstd. The channel's spatial values are split into `parts` contiguous
//     ranges, one warp each (so narrow groups still keep every warp busy); the parts are added in
//     a fixed order, so the result does not depend on timing. These are the per-sample gradients
//     of the affine parameters (written to grad_weight_partial / grad_bias_partial, (N, C)), and
//     with g = dz * gamma_c they give the group sums sum g and sum g * xhat;
//  3. dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), one elementwise pass.
// Dynamic shared memory: 2 * channels_per_group * parts accumulators + 2 * channels_per_group.
template <typename T, int kVec>
__global__ void group_norm_silu_backward_kernel(
    const T* __restrict__ grad_output, const T* __restrict__ input, const T* __restrict__ weight,
    const T* __restrict__ bias, T* __restrict__ grad_input,
    acc_type<T>* __restrict__ grad_weight_partial, acc_type<T>* __restrict__ grad_bias_partial,
    int channels, int spatial, int channels_per_group, int parts, acc_type<T> eps) {
  using acc_t = acc_type<T>;
  using PackT = Pack<T, kVec>;
  PYEVO_GN_DYNAMIC_SHARED(shared_bytes);
  acc_t* part_dz = reinterpret_cast<acc_t*>(shared_bytes);        // [cpg * parts]
  acc_t* part_dzx = part_dz + channels_per_group * parts;          // [cpg * parts]
  acc_t* channel_g = part_dzx + channels_per_group * parts;        // [cpg]: gamma_c * sum dz
  acc_t* channel_gx = channel_g + channels_per_group;              // [cpg]: gamma_c * sum dz xhat

  const int64_t slab = blockIdx.x;
  const int groups = channels / channels_per_group;
  const int slab_size = channels_per_group * spatial;
  const int packs = slab_size / kVec;
  const int channel_packs = spatial / kVec;  // exact when kVec > 1; spatial when kVec == 1
  const PackT* x = reinterpret_cast<const PackT*>(input + slab * slab_size);
  const PackT* dy = reinterpret_cast<const PackT*>(grad_output + slab * slab_size);
  PackT* dx = reinterpret_cast<PackT*>(grad_input + slab * slab_size);
  const int64_t sample = slab / groups;
  const int first_channel = static_cast<int>(slab % groups) * channels_per_group;

  acc_t mean, rstd;
  slab_statistics<T, kVec>(x, packs, slab_size, eps, mean, rstd);

  // ---- 2. per-channel sums, one warp per (channel, part)
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  const int items = channels_per_group * parts;
  const int part_length = (channel_packs + parts - 1) / parts;
  for (int item = warp; item < items; item += warps) {
    const int c = item / parts, part = item % parts;
    const acc_t gamma = to_acc(weight[first_channel + c]);
    const acc_t beta = to_acc(bias[first_channel + c]);
    const int begin = c * channel_packs + part * part_length;
    const int end = begin + part_length < (c + 1) * channel_packs ? begin + part_length
                                                                  : (c + 1) * channel_packs;
    acc_t sum_dz = 0, sum_dzx = 0;
    for (int p = begin + lane; p < end; p += kWarpSize) {
      const PackT xp = x[p];
      const PackT gp = dy[p];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t xhat = (to_acc(xp.values[k]) - mean) * rstd;
        const acc_t dz = silu_grad(xhat * gamma + beta, to_acc(gp.values[k]));
        sum_dz += dz;
        sum_dzx += dz * xhat;
      }
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      sum_dz += __shfl_down_sync(kFullWarpMask, sum_dz, offset);
      sum_dzx += __shfl_down_sync(kFullWarpMask, sum_dzx, offset);
    }
    if (lane == 0) {
      part_dz[item] = sum_dz;
      part_dzx[item] = sum_dzx;
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < channels_per_group; c += blockDim.x) {
    acc_t dz = 0, dzx = 0;
    for (int part = 0; part < parts; ++part) {
      dz += part_dz[c * parts + part];
      dzx += part_dzx[c * parts + part];
    }
    const int64_t index = sample * channels + first_channel + c;
    grad_bias_partial[index] = dz;
    grad_weight_partial[index] = dzx;
    const acc_t gamma = to_acc(weight[first_channel + c]);
    channel_g[c] = gamma * dz;
    channel_gx[c] = gamma * dzx;
  }
  __syncthreads();
  acc_t sum_g = 0, sum_gx = 0;
  for (int c = 0; c < channels_per_group; ++c) {
    sum_g += channel_g[c];
    sum_gx += channel_gx[c];
  }
  const acc_t mean_g = sum_g / static_cast<acc_t>(slab_size);
  const acc_t mean_gx = sum_gx / static_cast<acc_t>(slab_size);

  // ---- 3. the input gradient
  for (int p = threadIdx.x; p < packs; p += blockDim.x) {
    const int c = (p * kVec) / spatial;
    const acc_t gamma = to_acc(weight[first_channel + c]);
    const acc_t beta = to_acc(bias[first_channel + c]);
    const PackT xp = x[p];
    const PackT gp = dy[p];
    PackT result;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t xhat = (to_acc(xp.values[k]) - mean) * rstd;
      const acc_t g = silu_grad(xhat * gamma + beta, to_acc(gp.values[k])) * gamma;
      result.values[k] = from_acc<T>(rstd * (g - mean_g - xhat * mean_gx));
    }
    dx[p] = result;
  }
}

}  // namespace group_norm_silu_detail
}  // namespace cuda
}  // namespace pyevo
