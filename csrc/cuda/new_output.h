// Allocation of kernel outputs for the torch-side glue (csrc/cuda/*_runner.h). An ordinary
// at::empty, except in the host emulation build (tests/cuda_emulation, PYEVO_POISON_OUTPUTS),
// where outputs start as NaN so that an element a kernel fails to write shows in the tests.
#pragma once

#include <ATen/ATen.h>

#include <limits>

namespace pyevo {

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor output = at::empty(sizes, options);
#ifdef PYEVO_POISON_OUTPUTS
  if (at::isFloatingType(output.scalar_type())) {
    output.fill_(std::numeric_limits<double>::quiet_NaN());
  }
#endif
  return output;
}

}  // namespace pyevo
