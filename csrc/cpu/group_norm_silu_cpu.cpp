// CPU kernels of pyevo::shared_group_norm_silu (forward and backward): GroupNorm over the first
// C channels of shared affine parameters, fused with SiLU; and of
// pyevo::population_group_norm_silu, a loop over the forward. The loops, and how they split the
// work and keep precision, are in group_norm_silu_kernel_impl.h; this file compiles them for three
// instruction sets, picks one at run time, and wraps them as the op's CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "checks.h"

namespace pyevo {

namespace cpu_baseline {
#include "cpu/group_norm_silu_kernel_impl.h"
}  // namespace cpu_baseline

// The same loops compiled for wider vector units. A target pragma applies to every function
// defined up to its pop (lambdas included) and to nothing else; which copy runs is decided per
// call by cpu_isa() below. GCC on x86-64 only: elsewhere the baseline copy is all there is.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYEVO_CPU_ISA_VARIANTS 1

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace cpu_avx2 {
#include "cpu/group_norm_silu_kernel_impl.h"
}  // namespace cpu_avx2
#pragma GCC pop_options

// GCC's default tuning keeps AVX-512 code at 256-bit vectors; the kernels are arithmetic-bound
// (exp and a division per value), so 512-bit vectors pay off.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,fma,prefer-vector-width=512")
namespace cpu_avx512 {
#include "cpu/group_norm_silu_kernel_impl.h"
}  // namespace cpu_avx512
#pragma GCC pop_options
#endif

namespace {

enum class CpuIsa { kBaseline, kAvx2, kAvx512 };

CpuIsa cpu_isa() {
#ifdef PYEVO_CPU_ISA_VARIANTS
  static const CpuIsa isa = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      return CpuIsa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
    return CpuIsa::kBaseline;
  }();
  return isa;
#else
  return CpuIsa::kBaseline;
#endif
}

template <typename scalar_t>
auto* forward_kernel() {
#ifdef PYEVO_CPU_ISA_VARIANTS
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return &cpu_avx512::group_norm_silu_forward<scalar_t>;
    case CpuIsa::kAvx2: return &cpu_avx2::group_norm_silu_forward<scalar_t>;
    case CpuIsa::kBaseline: break;
  }
#endif
  return &cpu_baseline::group_norm_silu_forward<scalar_t>;
}

template <typename scalar_t>
auto* backward_kernel() {
#ifdef PYEVO_CPU_ISA_VARIANTS
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return &cpu_avx512::group_norm_silu_backward<scalar_t>;
    case CpuIsa::kAvx2: return &cpu_avx2::group_norm_silu_backward<scalar_t>;
    case CpuIsa::kBaseline: break;
  }
#endif
  return &cpu_baseline::group_norm_silu_backward<scalar_t>;
}

struct GroupNormShape {
  int64_t batch;
  int64_t channels;
  int64_t spatial;
};

GroupNormShape group_norm_shape(const at::Tensor& input) {
  const int64_t batch = input.size(0);
  const int64_t channels = input.size(1);
  const int64_t spatial = batch * channels == 0 ? 0 : input.numel() / (batch * channels);
  return {batch, channels, spatial};
}

at::Tensor shared_group_norm_silu_cpu(const at::Tensor& input, const at::Tensor& weight,
                                      const at::Tensor& bias, int64_t channels_per_group,
                                      double eps) {
  check_shared_group_norm_silu(input, weight, bias, channels_per_group, eps);
  const GroupNormShape shape = group_norm_shape(input);
  const at::Tensor x = input.contiguous();
  const at::Tensor gamma = weight.narrow(0, 0, shape.channels).contiguous();
  const at::Tensor beta = bias.narrow(0, 0, shape.channels).contiguous();
  at::Tensor output = at::empty(input.sizes(), input.options());
  if (input.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "shared_group_norm_silu_cpu", [&] {
        forward_kernel<scalar_t>()(
            x.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
            beta.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), shape.batch,
            shape.channels, shape.spatial, channels_per_group, eps);
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_group_norm_silu_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, int64_t channels_per_group, double eps) {
  check_shared_group_norm_silu_backward(grad_output, input, weight, bias, channels_per_group, eps);
  const GroupNormShape shape = group_norm_shape(input);
  const at::Tensor x = input.contiguous();
  const at::Tensor dout = grad_output.contiguous();
  const at::Tensor gamma = weight.narrow(0, 0, shape.channels).contiguous();
  const at::Tensor beta = bias.narrow(0, 0, shape.channels).contiguous();
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::zeros(bias.sizes(), bias.options());
  if (input.numel() == 0) return {grad_input, grad_weight, grad_bias};

  const at::ScalarType math_type = at::toOpMathType(input.scalar_type());
  at::Tensor grad_weight_partial =
      at::empty({shape.batch, shape.channels}, input.options().dtype(math_type));
  at::Tensor grad_bias_partial = at::empty_like(grad_weight_partial);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "shared_group_norm_silu_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        backward_kernel<scalar_t>()(
            dout.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
            grad_input.mutable_data_ptr<scalar_t>(), grad_weight_partial.mutable_data_ptr<acc_t>(),
            grad_bias_partial.mutable_data_ptr<acc_t>(), shape.batch, shape.channels,
            shape.spatial, channels_per_group, eps);
      });
  // Only the first C entries were used; the rest of the shared parameters get zero gradient.
  grad_weight.narrow(0, 0, shape.channels).copy_(grad_weight_partial.sum(0));
  grad_bias.narrow(0, 0, shape.channels).copy_(grad_bias_partial.sum(0));
  return {grad_input, grad_weight, grad_bias};
}

// The population op on the CPU: a loop over the single op (the CUDA kernel's reference).
std::vector<at::Tensor> population_group_norm_silu_cpu(at::TensorList inputs,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& bias,
                                                       int64_t channels_per_group, double eps) {
  check_population_group_norm_silu(inputs, weight, bias, channels_per_group, eps);
  std::vector<at::Tensor> outputs;
  outputs.reserve(inputs.size());
  for (const at::Tensor& input : inputs) {
    outputs.push_back(shared_group_norm_silu_cpu(input, weight, bias, channels_per_group, eps));
  }
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyevo, CPU, m) {
  m.impl("shared_group_norm_silu", &shared_group_norm_silu_cpu);
  m.impl("shared_group_norm_silu_backward", &shared_group_norm_silu_backward_cpu);
  m.impl("population_group_norm_silu", &population_group_norm_silu_cpu);
}

}  // namespace pyevo
