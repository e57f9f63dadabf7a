// Host-side entry points of the CUDA implicit-GEMM convolutions (kernels/conv_igemm.cu) behind
// pyevo::shared_conv2d (forward, grad_input, grad_weight) and pyevo::population_conv2d (forward,
// K candidates in one launch). Plain pointers, strides and sizes, no torch types, so the .cu file
// compiles without the torch headers; the torch op wrappers are csrc/cuda/shared_conv2d_cuda.cpp
// and csrc/cuda/population_cuda.cpp.
//
// Every problem reads the shared weight IN PLACE through its four strides: rows [0, C_out),
// columns [0, C_in) and the centred k x k crop [c, c + k) x [c, c + k), c = (K - k) / 2. Inputs
// and grad_output are read through their strides too (any layout, any channel prefix); outputs
// are written contiguous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pyevo {
namespace cuda {

enum class ConvDtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

// One convolution of a launch. For the forward, `output` = (batch, out_channels, out_height,
// out_width) contiguous; for grad_input, `output` = (batch, in_channels, height, width)
// contiguous; for grad_weight, see launch_conv_grad_weight.
struct ConvProblem {
  const void* input;        // x: (batch, >= in_channels, height, width), strides in elements
  int64_t input_stride[4];
  const void* grad_output;  // dy: (batch, out_channels, out_height, out_width) (backward only)
  int64_t grad_output_stride[4];
  void* output;
  int batch;
  int in_channels;   // used input channels (a prefix of the input's and of the weight's)
  int height;
  int width;
  int out_channels;  // used output channels (a prefix of the weight's rows)
  int out_height;
  int out_width;
  int kernel_size;   // k (odd); padding k / 2
  int crop_offset;   // (K - k) / 2 into the shared K x K kernel
  // Filled by prepare_conv_problems: this problem's GEMM column tiles and first tile of the grid.
  int tiles_n;
  int64_t tile_begin;
};

// What every problem of a launch shares.
struct ConvShared {
  const void* weight;  // (C_out_max, C_in_max, K, K) with strides in elements
  int64_t weight_stride[4];
  const void* bias;    // forward only; nullptr for none. Entry c at bias[c * bias_stride]
  int64_t bias_stride;
  int stride;
};

enum class ConvPass { kForward, kGradInput };

// Sets tiles_n and tile_begin of `count` problems (host memory) for a launch of `pass` in
// `dtype` and returns the total number of tiles (thread blocks) the launch needs. `tf32` picks the
// tensor-core path for float32 (it changes the tile shape, so pass the same value to the launch).
int64_t prepare_conv_problems(ConvPass pass, ConvDtype dtype, bool tf32, ConvProblem* problems,
                              int count);

// Launches `pass` over `count` prepared problems in one kernel. `problems` is the host copy (its
// first entry is passed by value when count == 1); `device_problems` a device copy of the same
// array, needed when count > 1 (nullptr otherwise). Returns the launch status.
cudaError_t launch_conv(ConvPass pass, ConvDtype dtype, bool tf32, const ConvShared& shared,
                        const ConvProblem* problems, const ConvProblem* device_problems, int count,
                        int64_t total_tiles, cudaStream_t stream);

// grad_weight of one problem: workspace_splits() partial sums over slices of the
// batch * out_height * out_width reduction are written to `workspace` (splits x out_channels x
// in_channels * k * k values of the accumulation type: float, or double for float64), then summed
// in a fixed order (deterministic) and written, converted to the dtype, into `grad_weight` at
// [co, ci, crop_offset + kh, crop_offset + kw] through `grad_weight_stride`. Elements of
// grad_weight outside the crop are not touched (the caller zero-fills it).
struct ConvGradWeightPlan {
  int splits;
  int64_t split_length;  // reduction elements per split (a multiple of the tile depth)
  int64_t tiles;         // GEMM tiles per split
  int64_t workspace_elements;
};
// Picks the split of the reduction for the current device (enough blocks to fill it).
ConvGradWeightPlan plan_conv_grad_weight(ConvDtype dtype, bool tf32, const ConvProblem& problem);
cudaError_t launch_conv_grad_weight(ConvDtype dtype, bool tf32, const ConvShared& shared,
                                    const ConvProblem& problem, const ConvGradWeightPlan& plan,
                                    void* workspace, void* grad_weight,
                                    const int64_t grad_weight_stride[4], cudaStream_t stream);

}  // namespace cuda
}  // namespace pyevo
