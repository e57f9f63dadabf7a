// CUDA GroupNorm+SiLU: the forward (one input, or the inputs of a population in one launch) and
// the fused backward (device code in group_norm_silu_kernel.cuh). Picks the pack width and block
// size and launches.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "group_norm_silu.h"
#include "group_norm_silu_kernel.cuh"
#include "numeric.cuh"

namespace pyevo {
namespace cuda {
namespace {

using group_norm_silu_detail::acc_type;
using group_norm_silu_detail::group_norm_silu_backward_kernel;
using group_norm_silu_detail::group_norm_silu_forward_kernel;
using group_norm_silu_detail::GroupNormParams;
using group_norm_silu_detail::kMaxThreads;
using group_norm_silu_detail::kWarpSize;

bool is_aligned(const void* pointer, std::uintptr_t alignment) {
  return reinterpret_cast<std::uintptr_t>(pointer) % alignment == 0;
}

// Enough threads that each does a handful of accesses, so the block's memory latency overlaps.
int threads_for(int64_t accesses) {
  return accesses >= 8192 ? kMaxThreads : accesses >= 2048 ? 256 : 128;
}

template <typename T>
cudaError_t launch_forward_typed(const GroupNormSiluInput* inputs,
                                 const GroupNormSiluInput* device_inputs, int count,
                                 int64_t total_slabs, const void* weight, const void* bias,
                                 int64_t channels_per_group, double eps, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // One pack width for the whole launch: packed when every input allows it.
  bool packed = true;
  int64_t largest_slab = 0;
  for (int i = 0; i < count; ++i) {
    packed = packed && inputs[i].spatial % kVec == 0 && is_aligned(inputs[i].input, 16) &&
             is_aligned(inputs[i].output, 16);
    largest_slab = std::max(largest_slab, channels_per_group * inputs[i].spatial);
  }
  const int threads = threads_for(packed ? largest_slab / kVec : largest_slab);
  GroupNormParams params{};
  params.first = inputs[0];
  params.table = device_inputs;
  params.count = count;
  params.weight = weight;
  params.bias = bias;
  params.channels_per_group = static_cast<int>(channels_per_group);
  params.eps = eps;
  const dim3 grid(static_cast<unsigned>(total_slabs));
  if (packed) {
    auto* kernel = &group_norm_silu_forward_kernel<T, kVec>;
    PYEVO_LAUNCH(kernel, grid, threads, 0, stream, params);
  } else {
    auto* kernel = &group_norm_silu_forward_kernel<T, 1>;
    PYEVO_LAUNCH(kernel, grid, threads, 0, stream, params);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_typed(const void* grad_output, const void* input, const void* weight,
                                  const void* bias, void* grad_input, void* grad_weight_partial,
                                  void* grad_bias_partial, int64_t batch, int64_t channels,
                                  int64_t spatial, int64_t channels_per_group, double eps,
                                  cudaStream_t stream) {
  using acc_t = acc_type<T>;
  constexpr int kVec = 16 / sizeof(T);
  const bool packed = spatial % kVec == 0 && is_aligned(input, 16) &&
                      is_aligned(grad_output, 16) && is_aligned(grad_input, 16);
  const int64_t slab_size = channels_per_group * spatial;
  const int threads = threads_for(packed ? slab_size / kVec : slab_size);
  const int warps = threads / kWarpSize;
  const int channel_packs = static_cast<int>(packed ? spatial / kVec : spatial);
  // Split each channel over several warps when there are fewer channels than warps.
  const int parts = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(warps / channels_per_group, channel_packs)));
  const size_t shared_bytes = sizeof(acc_t) * (2 * channels_per_group * parts +
                                               2 * channels_per_group);
  const dim3 grid(static_cast<unsigned>(batch * (channels / channels_per_group)));
  const auto* dy = static_cast<const T*>(grad_output);
  const auto* x = static_cast<const T*>(input);
  const auto* gamma = static_cast<const T*>(weight);
  const auto* beta = static_cast<const T*>(bias);
  auto* dx = static_cast<T*>(grad_input);
  auto* dgamma = static_cast<acc_t*>(grad_weight_partial);
  auto* dbeta = static_cast<acc_t*>(grad_bias_partial);
  const int c = static_cast<int>(channels), s = static_cast<int>(spatial),
            cpg = static_cast<int>(channels_per_group);
  const auto acc_eps = static_cast<acc_t>(eps);
  if (packed) {
    auto* kernel = &group_norm_silu_backward_kernel<T, kVec>;
    PYEVO_LAUNCH(kernel, grid, threads, shared_bytes, stream, dy, x, gamma, beta, dx, dgamma,
                 dbeta, c, s, cpg, parts, acc_eps);
  } else {
    auto* kernel = &group_norm_silu_backward_kernel<T, 1>;
    PYEVO_LAUNCH(kernel, grid, threads, shared_bytes, stream, dy, x, gamma, beta, dx, dgamma,
                 dbeta, c, s, cpg, parts, acc_eps);
  }
  return cudaGetLastError();
}

template <typename Fn>
cudaError_t dispatch(GroupNormSiluDtype dtype, Fn&& fn) {
  switch (dtype) {
    case GroupNormSiluDtype::kFloat32: return fn(float());
    case GroupNormSiluDtype::kFloat64: return fn(double());
    case GroupNormSiluDtype::kFloat16: return fn(__half());
    case GroupNormSiluDtype::kBFloat16: return fn(__nv_bfloat16());
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t prepare_group_norm_silu_population(GroupNormSiluInput* inputs, int count,
                                           int64_t channels_per_group) {
  int64_t total = 0;
  for (int i = 0; i < count; ++i) {
    inputs[i].slab_begin = total;
    total += inputs[i].batch * (inputs[i].channels / channels_per_group);
  }
  return total;
}

cudaError_t launch_group_norm_silu_population(GroupNormSiluDtype dtype,
                                              const GroupNormSiluInput* inputs,
                                              const GroupNormSiluInput* device_inputs, int count,
                                              int64_t total_slabs, const void* weight,
                                              const void* bias, int64_t channels_per_group,
                                              double eps, cudaStream_t stream) {
  if (count <= 0 || total_slabs == 0) return cudaSuccess;
  if (count > 1 && device_inputs == nullptr) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    return launch_forward_typed<T>(inputs, device_inputs, count, total_slabs, weight, bias,
                                   channels_per_group, eps, stream);
  });
}

cudaError_t launch_group_norm_silu_forward(GroupNormSiluDtype dtype, const void* input,
                                           const void* weight, const void* bias, void* output,
                                           int64_t batch, int64_t channels, int64_t spatial,
                                           int64_t channels_per_group, double eps,
                                           cudaStream_t stream) {
  GroupNormSiluInput one{input, output, batch, channels, spatial, 0};
  const int64_t slabs = prepare_group_norm_silu_population(&one, 1, channels_per_group);
  return launch_group_norm_silu_population(dtype, &one, nullptr, 1, slabs, weight, bias,
                                           channels_per_group, eps, stream);
}

cudaError_t launch_group_norm_silu_backward(GroupNormSiluDtype dtype, const void* grad_output,
                                            const void* input, const void* weight,
                                            const void* bias, void* grad_input,
                                            void* grad_weight_partial, void* grad_bias_partial,
                                            int64_t batch, int64_t channels, int64_t spatial,
                                            int64_t channels_per_group, double eps,
                                            cudaStream_t stream) {
  if (batch * channels * spatial == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto zero) {
    using T = decltype(zero);
    return launch_backward_typed<T>(grad_output, input, weight, bias, grad_input,
                                    grad_weight_partial, grad_bias_partial, batch, channels,
                                    spatial, channels_per_group, eps, stream);
  });
}

}  // namespace cuda
}  // namespace pyevo
