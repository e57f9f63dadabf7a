#include "cuda_kernel_choice.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace pyevo {
namespace {
std::atomic<int> choice{static_cast<int>(CudaKernels::kAuto)};
}  // namespace

CudaKernels cuda_kernels() { return static_cast<CudaKernels>(choice.load()); }

void set_cuda_kernels(CudaKernels value) { choice.store(static_cast<int>(value)); }

CudaKernels cuda_kernels_from_name(const std::string& name) {
  if (name == "auto") return CudaKernels::kAuto;
  if (name == "pyevo") return CudaKernels::kPyevo;
  TORCH_CHECK(false, "pyevo: unknown CUDA kernel choice '", name, "' (expected 'auto' or 'pyevo')");
}

std::string cuda_kernels_name(CudaKernels value) {
  return value == CudaKernels::kPyevo ? "pyevo" : "auto";
}

}  // namespace pyevo
