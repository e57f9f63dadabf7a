// CUDA forward of pyevo::shared_group_norm_silu: silu(group_norm(x)) in one kernel (device code
// in group_norm_silu_kernel.cuh). Picks the pack width and block size and launches.
#include <cuda_runtime.h>

#include <cstdint>

#include "group_norm_silu.h"
#include "group_norm_silu_kernel.cuh"

namespace pyevo {
namespace cuda {
namespace {

using group_norm_silu_detail::acc_type;
using group_norm_silu_detail::group_norm_silu_forward_kernel;
using group_norm_silu_detail::kMaxThreads;

bool is_aligned(const void* pointer, std::uintptr_t alignment) {
  return reinterpret_cast<std::uintptr_t>(pointer) % alignment == 0;
}

template <typename T>
cudaError_t launch_typed(const void* input, const void* weight, const void* bias, void* output,
                         int64_t batch, int64_t channels, int64_t spatial,
                         int64_t channels_per_group, double eps, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t groups = channels / channels_per_group;
  const int64_t slabs = batch * groups;
  const int64_t slab_size = channels_per_group * spatial;
  const bool packed = spatial % kVec == 0 && is_aligned(input, 16) && is_aligned(output, 16);
  const int64_t accesses = packed ? slab_size / kVec : slab_size;
  // Enough threads that each does a handful of accesses, so the block's memory latency overlaps.
  const int threads = accesses >= 8192 ? kMaxThreads : accesses >= 2048 ? 256 : 128;
  const dim3 grid(static_cast<unsigned>(slabs));
  const auto* x = static_cast<const T*>(input);
  const auto* gamma = static_cast<const T*>(weight);
  const auto* beta = static_cast<const T*>(bias);
  auto* y = static_cast<T*>(output);
  const auto acc_eps = static_cast<acc_type<T>>(eps);
  if (packed) {
    group_norm_silu_forward_kernel<T, kVec><<<grid, threads, 0, stream>>>(
        x, gamma, beta, y, static_cast<int>(spatial), static_cast<int>(channels_per_group),
        static_cast<int>(groups), acc_eps);
  } else {
    group_norm_silu_forward_kernel<T, 1><<<grid, threads, 0, stream>>>(
        x, gamma, beta, y, static_cast<int>(spatial), static_cast<int>(channels_per_group),
        static_cast<int>(groups), acc_eps);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_group_norm_silu_forward(GroupNormSiluDtype dtype, const void* input,
                                           const void* weight, const void* bias, void* output,
                                           int64_t batch, int64_t channels, int64_t spatial,
                                           int64_t channels_per_group, double eps,
                                           cudaStream_t stream) {
  switch (dtype) {
    case GroupNormSiluDtype::kFloat32:
      return launch_typed<float>(input, weight, bias, output, batch, channels, spatial,
                                 channels_per_group, eps, stream);
    case GroupNormSiluDtype::kFloat64:
      return launch_typed<double>(input, weight, bias, output, batch, channels, spatial,
                                  channels_per_group, eps, stream);
    case GroupNormSiluDtype::kFloat16:
      return launch_typed<__half>(input, weight, bias, output, batch, channels, spatial,
                                  channels_per_group, eps, stream);
    case GroupNormSiluDtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(input, weight, bias, output, batch, channels, spatial,
                                         channels_per_group, eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace pyevo
