// Host-side entry points of the CUDA GroupNorm+SiLU kernels (kernels/group_norm_silu.cu). Plain
// pointers and sizes, no torch types, so the .cu file compiles without the torch headers; the
// torch op wrappers are csrc/cuda/group_norm_silu_cuda.cpp and csrc/cuda/population_cuda.cpp.
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

// One input of a population launch (pyevo::population_group_norm_silu): contiguous
// (batch, channels, spatial) values and their output, same layout. slab_begin is set by
// prepare_group_norm_silu_population.
struct GroupNormSiluInput {
  const void* input;
  void* output;
  int64_t batch;
  int64_t channels;
  int64_t spatial;
  int64_t slab_begin;
};

// Numbers the (sample, group) slabs of `count` inputs (host memory) and returns their total.
int64_t prepare_group_norm_silu_population(GroupNormSiluInput* inputs, int count,
                                           int64_t channels_per_group);

// All `count` prepared inputs in one launch, normalised with the shared weight and bias (at least
// max(channels) entries each). `device_inputs` is a device copy of the array (nullptr when
// count == 1).
cudaError_t launch_group_norm_silu_population(GroupNormSiluDtype dtype,
                                              const GroupNormSiluInput* inputs,
                                              const GroupNormSiluInput* device_inputs, int count,
                                              int64_t total_slabs, const void* weight,
                                              const void* bias, int64_t channels_per_group,
                                              double eps, cudaStream_t stream);

// The backward of the forward above: grad_input (contiguous, the input's dtype) and the
// per-sample gradients of the used affine parameters, grad_weight_partial and grad_bias_partial
// ((batch, channels), float; double for float64), which the caller sums over the batch.
cudaError_t launch_group_norm_silu_backward(GroupNormSiluDtype dtype, const void* grad_output,
                                            const void* input, const void* weight,
                                            const void* bias, void* grad_input,
                                            void* grad_weight_partial, void* grad_bias_partial,
                                            int64_t batch, int64_t channels, int64_t spatial,
                                            int64_t channels_per_group, double eps,
                                            cudaStream_t stream);

}  // namespace cuda
}  // namespace pyevo
