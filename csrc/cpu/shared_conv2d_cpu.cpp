// CPU kernels of pyevo::shared_conv2d: ATen's convolution (oneDNN where it applies) run directly
// on the strided view of the shared weight, so the sub-kernel is never copied out by us.
// pyevo::population_conv2d on the CPU is a loop over that op, one candidate at a time
// (population_conv2d_composite). The CUDA kernels of these ops are the same composites
// (csrc/cuda/shared_conv2d_cuda.cpp).
// pyevo::fused_conv2d on the CPU is its composite too (fused_conv2d_composite): the convolution,
// then the epilogue (bias, temb, residual, scale) as ATen ops; the CUDA kernel's reference.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "composite_kernels.h"

namespace pyevo {

TORCH_LIBRARY_IMPL(pyevo, CPU, m) {
  m.impl("shared_conv2d", &shared_conv2d_composite);
  m.impl("shared_conv2d_backward", &shared_conv2d_backward_composite);
  m.impl("population_conv2d", &population_conv2d_composite);
  m.impl("fused_conv2d", &fused_conv2d_composite);
}

}  // namespace pyevo
