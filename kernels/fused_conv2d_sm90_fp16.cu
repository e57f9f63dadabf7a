// The float16 instance of the Hopper fused convolution (kernels/fused_conv2d_sm90_kernel.cuh). One
// file per dtype so that the two instances, each a large template, compile in parallel.

// torch.utils.cpp_extension compiles .cu files without NDEBUG, which leaves CuTe's device-side
// assert()s in the kernel; their calls cross the GMMA pipeline and ptxas then serialises every
// wgmma (warning C7510). Release asserts off for this file, before any header is included.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "fused_conv2d_sm90_kernel.cuh"

namespace pyevo {
namespace cuda {

const char* fused_conv2d_sm90_unsupported_fp16(const FusedConvProblem& problem) {
  return fused_conv2d_sm90_detail::unsupported<cutlass::half_t>(problem);
}

const char* fused_conv2d_sm90_run_fp16(const FusedConvProblem& problem, cudaStream_t stream) {
  return fused_conv2d_sm90_detail::run<cutlass::half_t>(problem, stream);
}

}  // namespace cuda
}  // namespace pyevo
