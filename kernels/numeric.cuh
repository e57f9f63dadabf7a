// The launch macros of the kernels here, and per-dtype arithmetic helpers of the attention kernel:
// the accumulation type (float for float32/float16/bfloat16, double for float64) and conversions
// to and from it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Kernel launches and dynamic shared memory go through these macros so that the same sources also
// build for the host emulation of tests/cuda_emulation (g++, PYEVO_HOST_EMULATION), which runs the
// device code on a CPU to check its logic.
#ifdef PYEVO_HOST_EMULATION
#define PYEVO_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::pyevo_emulation::launch(kernel, grid, block, shared_bytes, __VA_ARGS__)
#define PYEVO_DYNAMIC_SHARED(name) unsigned char* name = ::pyevo_emulation::dynamic_smem()
#else
#define PYEVO_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__)
#define PYEVO_DYNAMIC_SHARED(name)                                 \
  extern __shared__ __align__(128) unsigned char name##_storage[]; \
  unsigned char* name = name##_storage
#endif

namespace pyevo {
namespace cuda {

template <typename T>
struct Numeric;

template <>
struct Numeric<float> {
  using acc = float;
  __device__ __forceinline__ static float to_acc(float v) { return v; }
  __device__ __forceinline__ static float from_acc(float v) { return v; }
};

template <>
struct Numeric<double> {
  using acc = double;
  __device__ __forceinline__ static double to_acc(double v) { return v; }
  __device__ __forceinline__ static double from_acc(double v) { return v; }
};

template <>
struct Numeric<__half> {
  using acc = float;
  __device__ __forceinline__ static float to_acc(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_acc(float v) { return __float2half_rn(v); }
};

template <>
struct Numeric<__nv_bfloat16> {
  using acc = float;
  __device__ __forceinline__ static float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_acc(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <typename T>
using acc_t = typename Numeric<T>::acc;

// The zero of T (the 16-bit types have no constexpr zero constructor on every toolkit).
template <typename T>
__device__ __forceinline__ T zero_value() {
  return Numeric<T>::from_acc(acc_t<T>(0));
}

}  // namespace cuda
}  // namespace pyevo
