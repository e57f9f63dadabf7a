// CUDA kernels of pyevo::shared_conv2d: ATen's convolution (cuDNN) on the strided view of the
// shared weight, as on the CPU (csrc/cpu/shared_conv2d_cpu.cpp). No custom kernel yet.
#include <torch/library.h>

#include "composite_kernels.h"

TORCH_LIBRARY_IMPL(pyevo, CUDA, m) {
  m.impl("shared_conv2d", &pyevo::shared_conv2d_composite);
  m.impl("shared_conv2d_backward", &pyevo::shared_conv2d_backward_composite);
}
