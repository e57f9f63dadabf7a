// Launchers of the fused softmax attention (device code in flash_attention_kernel.cuh).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "flash_attention.h"
#include "flash_attention_kernel.cuh"

namespace pyevo {
namespace cuda {
namespace {

using attention_detail::AttentionParams;
using attention_detail::kFmaQueries;
using attention_detail::kWmmaQueries;
using attention_detail::kWmmaThreads;
using attention_detail::WmmaLayout;

int compute_capability_major() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return 0;
  }
  return major;
}

// A kernel that needs more than 48 KiB of dynamic shared memory must say so once per device.
// The record of what was allowed is per kernel (Kernel is a template argument, not a parameter):
// kernels of one signature, e.g. the float16 and bfloat16 instances, each need their own call.
template <auto Kernel>
cudaError_t allow_shared_memory(int bytes) {
  constexpr int kDevices = 64;
  static std::atomic<int> allowed[kDevices];  // bytes already allowed to this kernel, per device
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  if (bytes <= 48 * 1024) return cudaSuccess;
  if (device < kDevices && allowed[device].load() >= bytes) return cudaSuccess;
  status = cudaFuncSetAttribute(reinterpret_cast<const void*>(Kernel),
                                cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (status == cudaSuccess && device < kDevices) allowed[device].store(bytes);
  return status;
}

template <typename T, int kD>
cudaError_t launch_wmma(const AttentionParams& params, dim3 grid, cudaStream_t stream) {
  constexpr auto kernel = &attention_detail::flash_attention_wmma_kernel<T, kD>;
  const int bytes = WmmaLayout<T, kD>::BYTES;
  const cudaError_t status = allow_shared_memory<kernel>(bytes);
  if (status != cudaSuccess) return status;
  PYEVO_LAUNCH(kernel, grid, kWmmaThreads, bytes, stream, params);
  return cudaGetLastError();
}

template <int kD>
cudaError_t launch_fma(const AttentionParams& params, dim3 grid, cudaStream_t stream) {
  auto* kernel = &attention_detail::flash_attention_fma_kernel<kD>;
  PYEVO_LAUNCH(kernel, grid, kFmaQueries, 0, stream, params);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_wmma_for_head_dim(int head_dim, const AttentionParams& params, dim3 grid,
                                     cudaStream_t stream) {
  if (head_dim <= 16) return launch_wmma<T, 16>(params, grid, stream);
  if (head_dim <= 32) return launch_wmma<T, 32>(params, grid, stream);
  return launch_wmma<T, 64>(params, grid, stream);
}

}  // namespace

bool flash_attention_supported(AttentionDtype dtype, int64_t head_dim) {
  if (head_dim < 1 || head_dim > 64) return false;
  switch (dtype) {
    case AttentionDtype::kFloat16:
    case AttentionDtype::kBFloat16: return compute_capability_major() >= 8;
    case AttentionDtype::kFloat32: return true;
    case AttentionDtype::kFloat64: return false;
  }
  return false;
}

cudaError_t launch_flash_attention(AttentionDtype dtype, const AttentionProblem* problems,
                                   const AttentionProblem* device_problems, int count, int batch,
                                   int head_dim, double scale, cudaStream_t stream) {
  if (count <= 0 || batch <= 0) return cudaSuccess;
  if (!flash_attention_supported(dtype, head_dim)) return cudaErrorNotSupported;
  if (count > 1 && device_problems == nullptr) return cudaErrorInvalidValue;
  const int queries_per_block =
      dtype == AttentionDtype::kFloat32 ? kFmaQueries : kWmmaQueries;
  int64_t q_tiles = 0, heads = 0;
  for (int i = 0; i < count; ++i) {
    if (problems[i].kv_seq < 1) return cudaErrorInvalidValue;
    q_tiles = std::max<int64_t>(q_tiles, (problems[i].seq + queries_per_block - 1) / queries_per_block);
    heads = std::max<int64_t>(heads, problems[i].heads);
  }
  const int64_t samples = static_cast<int64_t>(batch) * count;
  if (q_tiles == 0 || heads == 0) return cudaSuccess;
  if (q_tiles > 0x7fffffff || heads > 65535 || samples > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(q_tiles), static_cast<unsigned>(heads),
                  static_cast<unsigned>(samples));
  AttentionParams params{};
  params.first = problems[0];
  params.table = device_problems;
  params.count = count;
  params.batch = batch;
  params.head_dim = head_dim;
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  switch (dtype) {
    case AttentionDtype::kFloat16:
      return launch_wmma_for_head_dim<__half>(head_dim, params, grid, stream);
    case AttentionDtype::kBFloat16:
      return launch_wmma_for_head_dim<__nv_bfloat16>(head_dim, params, grid, stream);
    case AttentionDtype::kFloat32:
      if (head_dim <= 16) return launch_fma<16>(params, grid, stream);
      if (head_dim <= 32) return launch_fma<32>(params, grid, stream);
      return launch_fma<64>(params, grid, stream);
    case AttentionDtype::kFloat64: break;
  }
  return cudaErrorNotSupported;
}

}  // namespace cuda
}  // namespace pyevo
