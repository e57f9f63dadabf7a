// CPU kernels of pyevo::shared_conv2d: ATen's convolution (oneDNN where it applies) run directly
// on the strided view of the shared weight, so the sub-kernel is never copied out by us.
#include <torch/library.h>

#include "composite_kernels.h"

TORCH_LIBRARY_IMPL(pyevo, CPU, m) {
  m.impl("shared_conv2d", &pyevo::shared_conv2d_composite);
  m.impl("shared_conv2d_backward", &pyevo::shared_conv2d_backward_composite);
}
