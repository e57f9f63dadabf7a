// CUDA kernels of pyevo::shared_group_norm_silu.
//  * forward: our fused kernel (kernels/group_norm_silu.cu).
//  * backward: for now the ATen composite shared_group_norm_silu_backward_composite
//    (csrc/composite_kernels.cpp): at::native_group_norm recomputes the normalised values and
//    statistics, the SiLU derivative is applied elementwise, and at::native_group_norm_backward
//    does the rest; gradients of the shared parameters are scattered into full-length zeros.
//    About four more passes over memory than a fused backward would need.
#include <ATen/ATen.h>
// The c10 stream and guard headers, not ATen/cuda/CUDAContext.h: that one needs the cuBLAS and
// cuSPARSE headers, which a bare CUDA toolkit (like the build machine's) lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "composite_kernels.h"
#include "group_norm_silu.h"

namespace pyevo {
namespace {

cuda::GroupNormSiluDtype kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return cuda::GroupNormSiluDtype::kFloat32;
    case at::kDouble: return cuda::GroupNormSiluDtype::kFloat64;
    case at::kHalf: return cuda::GroupNormSiluDtype::kFloat16;
    case at::kBFloat16: return cuda::GroupNormSiluDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "pyevo::shared_group_norm_silu: CUDA supports float32, float64, float16 ",
                  "and bfloat16 inputs, got ", type);
  }
}

at::Tensor shared_group_norm_silu_cuda(const at::Tensor& input, const at::Tensor& weight,
                                       const at::Tensor& bias, int64_t channels_per_group,
                                       double eps) {
  check_shared_group_norm_silu(input, weight, bias, channels_per_group, eps);
  constexpr const char* op = "pyevo::shared_group_norm_silu";
  TORCH_CHECK(input.is_cuda(), op, ": the CUDA kernel got a tensor on ", input.device());
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t batch = input.size(0);
  const int64_t channels = input.size(1);
  at::Tensor output = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return output;
  const int64_t spatial = input.numel() / (batch * channels);
  const int64_t groups = channels / channels_per_group;
  // The kernel indexes within a slab with 32-bit ints and launches one block per slab.
  TORCH_CHECK(channels_per_group * spatial <= std::numeric_limits<int32_t>::max(), op,
              ": a group of ", channels_per_group, " channels x ", spatial,
              " values is too large for the CUDA kernel");
  TORCH_CHECK(batch * groups <= std::numeric_limits<int32_t>::max(), op, ": ", batch, " x ",
              groups, " groups is too many for the CUDA kernel");

  const at::Tensor x = input.contiguous();
  const at::Tensor gamma = weight.narrow(0, 0, channels).contiguous();
  const at::Tensor beta = bias.narrow(0, 0, channels).contiguous();
  const cudaError_t status = cuda::launch_group_norm_silu_forward(
      kernel_dtype(input.scalar_type()), x.const_data_ptr(), gamma.const_data_ptr(),
      beta.const_data_ptr(), output.mutable_data_ptr(), batch, channels, spatial,
      channels_per_group, eps, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyevo, CUDA, m) {
  m.impl("shared_group_norm_silu", &shared_group_norm_silu_cuda);
  m.impl("shared_group_norm_silu_backward", &shared_group_norm_silu_backward_composite);
}

}  // namespace pyevo
