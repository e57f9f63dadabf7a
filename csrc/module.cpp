// The pybind11 module pyevo._C: importing it loads the op registrations in this library
// (TORCH_LIBRARY blocks in csrc/) and reports how the extension was built.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "checks.h"
#include "composite_kernels.h"
#include "cuda_kernel_choice.h"
#ifdef PYEVO_WITH_CUDA
#include "cuda/fused_conv2d_cuda.h"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::string(PYEVO_TORCH_VERSION);
#ifdef PYEVO_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::string(PYEVO_CUDA_VERSION);
  std::vector<std::string> archs;
  std::string list = PYEVO_CUDA_ARCHS;
  size_t start = 0;
  while (start <= list.size()) {
    size_t end = list.find_first_of("; ", start);
    if (end == std::string::npos) end = list.size();
    if (end > start) archs.push_back(list.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = archs;
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = std::vector<std::string>{};
#endif
#ifdef PYEVO_WITH_CUTLASS_SM90
  info["cutlass_sm90"] = true;
#else
  info["cutlass_sm90"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

// Which kernel pyevo::fused_conv2d runs for these arguments on their device (tests, benchmarks).
std::string fused_conv2d_kernel(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& temb,
                                const std::optional<at::Tensor>& residual, int64_t out_channels,
                                int64_t kernel_size) {
#ifdef PYEVO_WITH_CUDA
  if (input.is_cuda()) {
    return pyevo::fused_conv2d_cuda_kernel(input, weight, bias, temb, residual, out_channels,
                                           kernel_size);
  }
#endif
  pyevo::check_fused_conv2d(input, weight, bias, temb, residual, 1.0, out_channels, kernel_size);
  return "aten: the " + std::string(c10::DeviceTypeName(input.device().type())) +
         " kernel is the composite";
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyevo compiled ops (registered as torch.ops.pyevo.*)";
  m.def("build_info", &build_info,
        "How this extension was built: cuda (bool), cuda_archs, cuda_version, cutlass_sm90 (the "
        "Hopper fused conv is in it), torch_version, openmp");
  m.def("_fused_conv2d_kernel", &fused_conv2d_kernel, pybind11::arg("input"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("temb"),
        pybind11::arg("residual"), pybind11::arg("out_channels"), pybind11::arg("kernel_size"),
        "Which kernel pyevo::fused_conv2d would run for these arguments: 'cutlass_sm90', or "
        "'aten: <why not>' (cuDNN/oneDNN convolution + the epilogue as ATen ops)");
  // The ATen composites that serve as CUDA backward kernels, callable on any device so that the
  // CPU test suite covers them.
  m.def("_shared_group_norm_silu_backward_composite",
        &pyevo::shared_group_norm_silu_backward_composite,
        "shared_group_norm_silu_backward built from ATen ops (for tests)");
  m.def(
      "_set_cuda_kernels",
      [](const std::string& name) { pyevo::set_cuda_kernels(pyevo::cuda_kernels_from_name(name)); },
      "Which kernels the CUDA ops use where ATen has its own: 'auto' or 'pyevo' "
      "(pyevo.ops.set_cuda_kernels)");
  m.def(
      "_get_cuda_kernels", [] { return pyevo::cuda_kernels_name(pyevo::cuda_kernels()); },
      "The current CUDA kernel choice (pyevo.ops.get_cuda_kernels)");
  // Likewise the CUDA backward of shared_attention (the CPU one uses ATen's CPU flash kernels).
  m.def("_shared_attention_backward_composite", &pyevo::shared_attention_backward_composite,
        "shared_attention_backward with a materialised attention matrix (for tests)");
}
