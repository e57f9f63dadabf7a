// CUDA kernels of pyevo::shared_attention and pyevo::population_attention.
//  * forward: at::linear on prefix views of the shared projections (cuBLAS through ATen; nothing
//    copied), then our fused softmax attention (kernels/flash_attention.cu: tensor cores for
//    float16/bfloat16, FMAs for float32; head_dim up to 64), heads side by side, then the output
//    projection on the column prefix of out_weight. float64 and head_dim > 64 fall back to
//    at::scaled_dot_product_attention (csrc/cuda/attention_runner.h).
//    That is the forward under impl="pyevo"; under "aten" it is the ATen composite (SDPA), and
//    under "auto" (the default) the measured table's choice for the GPU and shape, the composite
//    where it has none (csrc/cuda_kernel_choice.h): on an H100 SDPA was faster at most measured
//    shapes (experiments/device/README.md, 2026-11-26). population_attention always uses pyevo's.
//  * backward: recomputed through ATen (shared_attention_backward_composite: the projections
//    again, the attention matrix materialised, the chain rule through the projections). The
//    search only evaluates attention candidates; training runs on it rarely.
//  * population_attention: with one shared input, the projections and the attention core run
//    once for the most heads any candidate keeps, then one output projection per distinct head
//    count; with one input per candidate, all attention cores run in ONE launch.
#include <ATen/ATen.h>
// The c10 stream and guard headers, not ATen/cuda/CUDAContext.h: that one needs the cuBLAS and
// cuSPARSE headers, which a bare CUDA toolkit (like the build machine's) lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "attention_runner.h"
#include "checks.h"
#include "composite_kernels.h"
#include "cuda_kernel_choice.h"
#include "device_table.h"

namespace pyevo {
namespace {

at::Tensor shared_attention_cuda(
    const at::Tensor& hidden_states, const std::optional<at::Tensor>& encoder_hidden_states,
    const at::Tensor& q_weight, const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight,
    const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, int64_t heads, int64_t head_dim,
    c10::string_view kernel) {
  constexpr const char* op = "pyevo::shared_attention";
  const KernelRequest request =
      kernel_request_from_name(std::string_view(kernel.data(), kernel.size()), op);
  check_on_cuda(hidden_states, op);
  check_shared_attention(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias,
                         v_weight, v_bias, out_weight, out_bias, heads, head_dim);
  const ResolvedKernel resolved =
      resolve_kernel(request, hidden_states.device(), "shared_attention", [&] {
        return shared_attention_shape_key(hidden_states, encoder_hidden_states, heads, head_dim);
      });
  if (resolved.kernel == Kernel::kAten) {
    return shared_attention_composite(hidden_states, encoder_hidden_states, q_weight, q_bias,
                                      k_weight, k_bias, v_weight, v_bias, out_weight, out_bias,
                                      heads, head_dim);
  }
  const c10::cuda::CUDAGuard device_guard(hidden_states.device());
  return attention_runner::attention_forward(hidden_states, encoder_hidden_states, q_weight, q_bias,
                                             k_weight, k_bias, v_weight, v_bias, out_weight,
                                             out_bias, heads, head_dim,
                                             c10::cuda::getCurrentCUDAStream(), op);
}

std::vector<at::Tensor> population_attention_cuda(
    at::TensorList hidden_states, const at::Tensor& q_weight,
    const std::optional<at::Tensor>& q_bias, const at::Tensor& k_weight,
    const std::optional<at::Tensor>& k_bias, const at::Tensor& v_weight,
    const std::optional<at::Tensor>& v_bias, const at::Tensor& out_weight,
    const std::optional<at::Tensor>& out_bias, at::IntArrayRef heads, int64_t head_dim) {
  constexpr const char* op = "pyevo::population_attention";
  check_population_attention(hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                             out_weight, out_bias, heads, head_dim);
  check_on_cuda(q_weight, op);
  const at::Device device = q_weight.device();
  const c10::cuda::CUDAGuard device_guard(device);
  return attention_runner::population_attention_forward(
      hidden_states.vec(), q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight,
      out_bias, heads, head_dim, c10::cuda::getCurrentCUDAStream(),
      [device](const void* data, int64_t bytes) { return upload_table(data, bytes, device); }, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyevo, CUDA, m) {
  m.impl("shared_attention", &shared_attention_cuda);
  m.impl("shared_attention_backward", &shared_attention_backward_composite);
  m.impl("population_attention", &population_attention_cuda);
}

}  // namespace pyevo
