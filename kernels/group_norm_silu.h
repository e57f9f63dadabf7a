// Host-side entry points of the CUDA GroupNorm+SiLU kernels (kernels/group_norm_silu.cu). Plain
// pointers and sizes, no torch types, so the .cu file compiles without the torch headers; the
// torch op wrapper is csrc/cuda/group_norm_silu_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pyevo {
namespace cuda {

enum class GroupNormSiluDtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

// output = silu(group_norm(input)) for contiguous (batch, channels, spatial) data, groups of
// channels_per_group channels; weight and bias hold (at least) `channels` entries of the input's
// dtype. Statistics and arithmetic in float (double for float64). Enqueues on `stream` and
// returns the launch status (cudaSuccess when the kernel was enqueued).
cudaError_t launch_group_norm_silu_forward(GroupNormSiluDtype dtype, const void* input,
                                           const void* weight, const void* bias, void* output,
                                           int64_t batch, int64_t channels, int64_t spatial,
                                           int64_t channels_per_group, double eps,
                                           cudaStream_t stream);

}  // namespace cuda
}  // namespace pyevo
