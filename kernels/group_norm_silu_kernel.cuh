// Device code of the CUDA GroupNorm+SiLU forward; launched by kernels/group_norm_silu.cu.
// Kept apart from the launcher so it can be compiled on its own (e.g. for a host emulation).
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

// Grid: one block per slab (blockIdx.x = sample * groups + group).
template <typename T, int kVec>
__global__ void group_norm_silu_forward_kernel(const T* __restrict__ input,
                                               const T* __restrict__ weight,
                                               const T* __restrict__ bias, T* __restrict__ output,
                                               int spatial, int channels_per_group, int groups,
                                               acc_type<T> eps) {
  using acc_t = acc_type<T>;
  using PackT = Pack<T, kVec>;
  const int64_t slab = blockIdx.x;
  const int slab_size = channels_per_group * spatial;
  const int packs = slab_size / kVec;  // exact: spatial % kVec == 0 when kVec > 1
  const PackT* x = reinterpret_cast<const PackT*>(input + slab * slab_size);
  PackT* y = reinterpret_cast<PackT*>(output + slab * slab_size);

  WelfordState<acc_t> state = {0, 0, 0};
  for (int p = threadIdx.x; p < packs; p += blockDim.x) {
    const PackT pack = x[p];
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
  const acc_t mean = stats.mean;
  const acc_t rstd = inverse_sqrt(stats.m2 / static_cast<acc_t>(slab_size) + eps);

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

}  // namespace group_norm_silu_detail
}  // namespace cuda
}  // namespace pyevo
