// CUDA kernels of pyevo::shared_attention: at::linear on prefix views of the shared projections
// and at::scaled_dot_product_attention (flash / cuDNN / memory-efficient kernels), as on the CPU
// (csrc/cpu/shared_attention_cpu.cpp). The backward materialises the attention matrix.
#include <torch/library.h>

#include "composite_kernels.h"

TORCH_LIBRARY_IMPL(pyevo, CUDA, m) {
  m.impl("shared_attention", &pyevo::shared_attention_composite);
  m.impl("shared_attention_backward", &pyevo::shared_attention_backward_composite);
}
