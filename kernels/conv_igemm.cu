// Launchers of the implicit-GEMM convolutions (device code in conv_igemm_kernel.cuh): pick the
// engine and tile shape for the dtype and device, size the grid, launch.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "conv_igemm.h"
#include "conv_igemm_kernel.cuh"

namespace pyevo {
namespace cuda {
namespace {

using conv_detail::ConvParams;
using conv_detail::Engine;
using conv_detail::Mode;
using conv_detail::Tile;

int current_device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&value, attribute, device) != cudaSuccess) return 0;
  return value;
}

bool tensor_cores_available() {
  return current_device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8;
}

// The engine a dtype runs on here: tensor cores for float16/bfloat16 (compute capability >= 8.0
// required), tf32 tensor cores for float32 when allowed, FMAs otherwise.
Engine pick_engine(ConvDtype dtype, bool tf32) {
  switch (dtype) {
    case ConvDtype::kFloat16:
    case ConvDtype::kBFloat16: return Engine::kWmma16;
    case ConvDtype::kFloat32:
      return tf32 && tensor_cores_available() ? Engine::kWmmaTf32 : Engine::kFma;
    case ConvDtype::kFloat64: return Engine::kFma;
  }
  return Engine::kFma;
}

struct TileShape {
  int bm, bn, bk;
};

TileShape tile_shape(ConvDtype dtype, bool tf32) {
  switch (pick_engine(dtype, tf32)) {
    case Engine::kWmma16:
      return {Tile<__half, Engine::kWmma16>::BM, Tile<__half, Engine::kWmma16>::BN,
              Tile<__half, Engine::kWmma16>::BK};
    case Engine::kWmmaTf32:
      return {Tile<float, Engine::kWmmaTf32>::BM, Tile<float, Engine::kWmmaTf32>::BN,
              Tile<float, Engine::kWmmaTf32>::BK};
    case Engine::kFma:
      return {Tile<float, Engine::kFma>::BM, Tile<float, Engine::kFma>::BN,
              Tile<float, Engine::kFma>::BK};
  }
  return {64, 64, 16};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, Engine kEngine>
cudaError_t launch_typed(ConvPass pass, const ConvParams& params, int64_t tiles,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tiles));
  constexpr int threads = Tile<T, kEngine>::THREADS;
  auto* kernel = pass == ConvPass::kForward
                     ? &conv_detail::conv_igemm_kernel<T, kEngine, Mode::kForward>
                     : &conv_detail::conv_igemm_kernel<T, kEngine, Mode::kGradInput>;
  PYEVO_LAUNCH(kernel, grid, threads, 0, stream, params);
  return cudaGetLastError();
}

template <typename T, Engine kEngine>
cudaError_t launch_grad_weight_typed(const ConvParams& params, const ConvGradWeightPlan& plan,
                                     const ConvProblem& problem, void* grad_weight,
                                     const int64_t* s, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.splits));
  auto* kernel = &conv_detail::conv_igemm_kernel<T, kEngine, Mode::kGradWeight>;
  constexpr int threads = Tile<T, kEngine>::THREADS;
  PYEVO_LAUNCH(kernel, grid, threads, 0, stream, params);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  const int64_t rows = problem.out_channels;
  const int columns = problem.in_channels * problem.kernel_size * problem.kernel_size;
  const int64_t total = rows * columns;
  if (total == 0) return cudaSuccess;
  const int reduce_threads = 256;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>(ceil_div(total, reduce_threads), 8192));
  auto* reduce = &conv_detail::conv_grad_weight_reduce_kernel<T>;
  PYEVO_LAUNCH(reduce, blocks, reduce_threads, 0, stream,
               static_cast<const acc_t<T>*>(params.workspace), plan.splits, rows, columns,
               problem.kernel_size, problem.crop_offset, static_cast<T*>(grad_weight), s[0], s[1],
               s[2], s[3]);
  return cudaGetLastError();
}

}  // namespace

int64_t prepare_conv_problems(ConvPass pass, ConvDtype dtype, bool tf32, ConvProblem* problems,
                              int count) {
  const TileShape shape = tile_shape(dtype, tf32);
  int64_t total = 0;
  for (int i = 0; i < count; ++i) {
    ConvProblem& p = problems[i];
    int64_t rows, columns;
    if (pass == ConvPass::kForward) {
      rows = static_cast<int64_t>(p.batch) * p.out_height * p.out_width;
      columns = p.out_channels;
    } else {
      rows = static_cast<int64_t>(p.batch) * p.height * p.width;
      columns = p.in_channels;
    }
    p.tiles_n = static_cast<int>(ceil_div(columns, shape.bn));
    p.tile_begin = total;
    total += ceil_div(rows, shape.bm) * p.tiles_n;
  }
  return total;
}

cudaError_t launch_conv(ConvPass pass, ConvDtype dtype, bool tf32, const ConvShared& shared,
                        const ConvProblem* problems, const ConvProblem* device_problems, int count,
                        int64_t total_tiles, cudaStream_t stream) {
  if (count <= 0 || total_tiles == 0) return cudaSuccess;
  if (total_tiles > INT_MAX || (count > 1 && device_problems == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const Engine engine = pick_engine(dtype, tf32);
  if (engine != Engine::kFma && !tensor_cores_available()) return cudaErrorNotSupported;
  ConvParams params{};
  params.shared = shared;
  params.first = problems[0];
  params.table = device_problems;
  params.count = count;
  switch (dtype) {
    case ConvDtype::kFloat16:
      return launch_typed<__half, Engine::kWmma16>(pass, params, total_tiles, stream);
    case ConvDtype::kBFloat16:
      return launch_typed<__nv_bfloat16, Engine::kWmma16>(pass, params, total_tiles, stream);
    case ConvDtype::kFloat32:
      return engine == Engine::kWmmaTf32
                 ? launch_typed<float, Engine::kWmmaTf32>(pass, params, total_tiles, stream)
                 : launch_typed<float, Engine::kFma>(pass, params, total_tiles, stream);
    case ConvDtype::kFloat64:
      return launch_typed<double, Engine::kFma>(pass, params, total_tiles, stream);
  }
  return cudaErrorInvalidValue;
}

ConvGradWeightPlan plan_conv_grad_weight(ConvDtype dtype, bool tf32, const ConvProblem& problem) {
  const TileShape shape = tile_shape(dtype, tf32);
  const int64_t rows = problem.out_channels;
  const int64_t columns =
      static_cast<int64_t>(problem.in_channels) * problem.kernel_size * problem.kernel_size;
  const int64_t reduction =
      static_cast<int64_t>(problem.batch) * problem.out_height * problem.out_width;
  ConvGradWeightPlan plan{};
  plan.tiles = ceil_div(rows, shape.bm) * ceil_div(columns, shape.bn);
  // Enough blocks for about four per multiprocessor, each reducing at least 8 tile depths.
  const int64_t multiprocessors =
      std::max(1, current_device_attribute(cudaDevAttrMultiProcessorCount));
  const int64_t wanted = std::max<int64_t>(1, ceil_div(4 * multiprocessors, std::max<int64_t>(plan.tiles, 1)));
  int64_t length = ceil_div(std::max<int64_t>(reduction, 1), wanted);
  length = std::max<int64_t>(length, 8 * shape.bk);
  length = ceil_div(length, shape.bk) * shape.bk;
  plan.split_length = length;
  plan.splits = static_cast<int>(std::max<int64_t>(1, ceil_div(reduction, length)));
  plan.workspace_elements = plan.splits * rows * columns;
  return plan;
}

cudaError_t launch_conv_grad_weight(ConvDtype dtype, bool tf32, const ConvShared& shared,
                                    const ConvProblem& problem, const ConvGradWeightPlan& plan,
                                    void* workspace, void* grad_weight,
                                    const int64_t grad_weight_stride[4], cudaStream_t stream) {
  if (plan.tiles == 0) return cudaSuccess;
  if (plan.tiles > INT_MAX || plan.splits > 65535) return cudaErrorInvalidValue;
  const Engine engine = pick_engine(dtype, tf32);
  if (engine != Engine::kFma && !tensor_cores_available()) return cudaErrorNotSupported;
  const TileShape shape = tile_shape(dtype, tf32);
  ConvParams params{};
  params.shared = shared;
  params.first = problem;
  params.first.tiles_n = static_cast<int>(ceil_div(
      static_cast<int64_t>(problem.in_channels) * problem.kernel_size * problem.kernel_size,
      shape.bn));
  params.first.tile_begin = 0;
  params.table = nullptr;
  params.count = 1;
  params.workspace = workspace;
  params.split_length = plan.split_length;
  switch (dtype) {
    case ConvDtype::kFloat16:
      return launch_grad_weight_typed<__half, Engine::kWmma16>(params, plan, problem, grad_weight,
                                                               grad_weight_stride, stream);
    case ConvDtype::kBFloat16:
      return launch_grad_weight_typed<__nv_bfloat16, Engine::kWmma16>(
          params, plan, problem, grad_weight, grad_weight_stride, stream);
    case ConvDtype::kFloat32:
      return engine == Engine::kWmmaTf32
                 ? launch_grad_weight_typed<float, Engine::kWmmaTf32>(
                       params, plan, problem, grad_weight, grad_weight_stride, stream)
                 : launch_grad_weight_typed<float, Engine::kFma>(params, plan, problem, grad_weight,
                                                                 grad_weight_stride, stream);
    case ConvDtype::kFloat64:
      return launch_grad_weight_typed<double, Engine::kFma>(params, plan, problem, grad_weight,
                                                            grad_weight_stride, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace pyevo
