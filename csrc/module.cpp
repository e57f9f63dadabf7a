// The pybind11 module pyevo._C: importing it loads the op registrations in this library
// (TORCH_LIBRARY blocks in csrc/) and reports how the extension was built.
#include <torch/extension.h>

#include <string>
#include <tuple>
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

// Which kernel pyevo::fused_conv2d runs for these arguments and `kernel` request on their device
// (tests, benchmarks).
std::string fused_conv2d_kernel(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& temb,
                                const std::optional<at::Tensor>& residual, int64_t out_channels,
                                int64_t kernel_size, const std::string& kernel) {
  constexpr const char* op = "pyevo::fused_conv2d";
  [[maybe_unused]] const pyevo::KernelRequest request = pyevo::kernel_request_from_name(kernel, op);
#ifdef PYEVO_WITH_CUDA
  if (input.is_cuda()) {
    return pyevo::fused_conv2d_cuda_kernel(input, weight, bias, temb, residual, out_channels,
                                           kernel_size, request);
  }
#endif
  pyevo::check_fused_conv2d(input, weight, bias, temb, residual, 1.0, out_channels, kernel_size);
  return "aten: the " + std::string(c10::DeviceTypeName(input.device().type())) +
         " kernel is the composite";
}

// The measured table as pyevo/kernel_choices.py hands it over: (device, capability, shape key,
// "aten" or "pyevo") per entry.
void install_kernel_choices(
    const std::vector<std::tuple<std::string, std::string, std::string, std::string>>& entries) {
  std::vector<pyevo::MeasuredChoice> choices;
  for (const auto& [device, capability, shape_key, kernel] : entries) {
    TORCH_CHECK(kernel == "aten" || kernel == "pyevo", "pyevo: a measured kernel choice is 'aten' or "
                "'pyevo', got '", kernel, "'");
    choices.push_back({device, capability, shape_key,
                       kernel == "pyevo" ? pyevo::Kernel::kPyevo : pyevo::Kernel::kAten});
  }
  pyevo::install_measured_choices(choices);
}

pybind11::list shape_key_fields(const std::string& op) {
  pybind11::list fields;
  for (const auto& field : pyevo::shape_key_fields(op)) {
    fields.append(pybind11::make_tuple(field.name, field.is_flag));
  }
  return fields;
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
        pybind11::arg("impl") = "auto",
        "Which kernel pyevo::fused_conv2d would run for these arguments and kernel request: "
        "'cutlass_sm90', or 'aten: <why not>' (cuDNN/oneDNN convolution + the epilogue as ATen "
        "ops)");
  // The measured kernel-choice table (csrc/cuda_kernel_choice.h), for pyevo/kernel_choices.py
  // and pyevo.ops, which load, install and query it.
  m.def("_kernel_choice_shape_key_fields", &shape_key_fields, pybind11::arg("op"),
        "The fields of op's shape key in key order, each (name, is_flag)");
  m.def("_kernel_choice_shape_key", &pyevo::shape_key, pybind11::arg("op"),
        pybind11::arg("dtype"), pybind11::arg("values"),
        "The shape key of a table entry: op, dtype and the field values in key order");
  m.def("_fused_conv2d_shape_key", &pyevo::fused_conv2d_shape_key, pybind11::arg("input"),
        pybind11::arg("temb"), pybind11::arg("residual"), pybind11::arg("out_channels"),
        pybind11::arg("kernel_size"), "The shape key of a pyevo::fused_conv2d call");
  m.def("_shared_attention_shape_key", &pyevo::shared_attention_shape_key,
        pybind11::arg("hidden_states"), pybind11::arg("encoder_hidden_states"),
        pybind11::arg("heads"), pybind11::arg("head_dim"),
        "The shape key of a pyevo::shared_attention call");
  m.def("_install_kernel_choices", &install_kernel_choices, pybind11::arg("entries"),
        "Installs the measured table, once (pyevo.ops does at import)");
  m.def(
      "_measured_kernel_choice",
      [](const std::string& device, const std::string& capability, const std::string& shape_key) {
        return std::string(pyevo::kernel_name(pyevo::measured_choice(device, capability, shape_key)));
      },
      pybind11::arg("device"), pybind11::arg("capability"), pybind11::arg("shape_key"),
      "The installed table's choice for this GPU and shape key: 'aten' or 'pyevo' ('aten' without "
      "an entry)");
  m.def(
      "_resolve_kernel",
      [](const std::string& op, const c10::Device& device, const std::string& shape_key,
         const std::string& kernel) {
        pyevo::shape_key_fields(op);  // refuses an op without a choice
        const auto request = pyevo::kernel_request_from_name(kernel, ("pyevo::" + op).c_str());
        return std::string(pyevo::kernel_name(
            pyevo::resolve_kernel(request, device, op.c_str(), [&] { return shape_key; }).kernel));
      },
      pybind11::arg("op"), pybind11::arg("device"), pybind11::arg("shape_key"),
      pybind11::arg("impl"),
      "The implementation ('aten' or 'pyevo') a call of op on device with this shape key and "
      "kernel request runs, as the ops resolve it (pyevo.ops.kernel_choice)");
  // The ATen composites that serve as CUDA backward kernels, callable on any device so that the
  // CPU test suite covers them.
  m.def("_shared_group_norm_silu_backward_composite",
        &pyevo::shared_group_norm_silu_backward_composite,
        "shared_group_norm_silu_backward built from ATen ops (for tests)");
  // Likewise the CUDA backward of shared_attention (the CPU one uses ATen's CPU flash kernels).
  m.def("_shared_attention_backward_composite", &pyevo::shared_attention_backward_composite,
        "shared_attention_backward with a materialised attention matrix (for tests)");
}
