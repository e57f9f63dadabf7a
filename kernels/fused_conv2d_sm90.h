// Host-side entry points of the Hopper fused convolution behind pyevo::fused_conv2d's CUDA kernel:
//
//   out[n,h,w,c] = (conv(x, W)[n,h,w,c] + bias[c] + temb[n,c] + residual[n,h,w,c]) * scale
//
// a CUTLASS 3 implicit-GEMM fprop (TMA im2col loads, GMMA, fp32 accumulation) whose epilogue
// visitor tree adds bias, temb and the residual and scales before one TMA store. Device code:
// kernels/fused_conv2d_sm90_kernel.cuh, instantiated for bfloat16 and float16 in
// kernels/fused_conv2d_sm90_{bf16,fp16}.cu, which are compiled (for sm_90a) only when setup.py
// finds the CUTLASS headers; then it defines PYEVO_WITH_CUTLASS_SM90. Plain pointers and sizes,
// no torch or CUTLASS types, so that the torch glue (csrc/cuda/fused_conv2d_cuda.cpp) compiles
// with neither.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pyevo {
namespace cuda {

enum class FusedConvDtype { kFloat16, kBFloat16 };

// One fused convolution, stride 1, padding kernel_size / 2, channels-last throughout. Strides are
// in elements; every tensor's channel stride is 1.
struct FusedConvProblem {
  const void* input;         // (batch, height, width, in_channels): strides n, h, w
  int64_t input_stride[3];
  const void* weight;        // (out_channels, k, k, in_channels) "KRSC": strides k, r, s
  int64_t weight_stride[3];
  const void* bias;          // out_channels entries, contiguous; nullptr: none
  const void* temb;          // (batch, >= out_channels), row stride temb_stride; nullptr: none
  int64_t temb_stride;
  const void* residual;      // (batch, height, width, out_channels), pixel stride
  int64_t residual_stride;   //   residual_stride (rows of pixels evenly spaced); nullptr: none
  void* output;              // (batch, height, width, out_channels), packed
  float scale;
  int batch;
  int height;
  int width;
  int in_channels;
  int out_channels;
  int kernel_size;
};

// Per dtype (kernels/fused_conv2d_sm90_{bf16,fp16}.cu):
//  * ..._unsupported: nullptr when the kernel can run `problem` (alignment, channel multiples,
//    sizes, and CUTLASS's own can_implement), else a short reason for the fallback;
//  * ..._run: launches on `stream`; nullptr on success, else what failed.
const char* fused_conv2d_sm90_unsupported_bf16(const FusedConvProblem& problem);
const char* fused_conv2d_sm90_unsupported_fp16(const FusedConvProblem& problem);
const char* fused_conv2d_sm90_run_bf16(const FusedConvProblem& problem, cudaStream_t stream);
const char* fused_conv2d_sm90_run_fp16(const FusedConvProblem& problem, cudaStream_t stream);

inline const char* fused_conv2d_sm90_unsupported(FusedConvDtype dtype,
                                                 const FusedConvProblem& problem) {
  return dtype == FusedConvDtype::kBFloat16 ? fused_conv2d_sm90_unsupported_bf16(problem)
                                            : fused_conv2d_sm90_unsupported_fp16(problem);
}

inline const char* fused_conv2d_sm90_run(FusedConvDtype dtype, const FusedConvProblem& problem,
                                         cudaStream_t stream) {
  return dtype == FusedConvDtype::kBFloat16 ? fused_conv2d_sm90_run_bf16(problem, stream)
                                            : fused_conv2d_sm90_run_fp16(problem, stream);
}

}  // namespace cuda
}  // namespace pyevo
