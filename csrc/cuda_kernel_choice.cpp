#include "cuda_kernel_choice.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "composite_kernels.h"

#ifdef PYEVO_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace pyevo {

KernelRequest kernel_request_from_name(std::string_view name, const char* op) {
  if (name == "auto") return KernelRequest::kAuto;
  if (name == "aten") return KernelRequest::kAten;
  if (name == "pyevo") return KernelRequest::kPyevo;
  TORCH_CHECK(false, op, ": unknown impl '", std::string(name),
              "' (expected 'auto', 'aten' or 'pyevo')");
}

const char* kernel_name(Kernel kernel) { return kernel == Kernel::kPyevo ? "pyevo" : "aten"; }

// ---- Shape keys

const std::vector<ShapeKeyField>& shape_key_fields(const std::string& op) {
  static const std::vector<ShapeKeyField> fused_conv2d = {
      {"N", false},           {"C_in", false},     {"C_out", false},
      {"H", false},           {"W", false},        {"kernel_size", false},
      {"has_temb", true},     {"has_residual", true}, {"channels_last", true}};
  static const std::vector<ShapeKeyField> shared_attention = {
      {"B", false},        {"S", false},     {"C", false},    {"heads", false},
      {"head_dim", false}, {"cross", true},  {"S_kv", false}, {"C_kv", false}};
  if (op == "fused_conv2d") return fused_conv2d;
  if (op == "shared_attention") return shared_attention;
  TORCH_CHECK(false, "pyevo: no kernel choice for op '", op,
              "' (expected 'fused_conv2d' or 'shared_attention')");
}

std::string shape_key(const std::string& op, const std::string& dtype,
                      const std::vector<int64_t>& values) {
  const auto& fields = shape_key_fields(op);
  TORCH_CHECK(values.size() == fields.size(), "pyevo: the ", op, " shape key has ", fields.size(),
              " fields, got ", values.size(), " values");
  std::string key = op + "|" + dtype + "|";
  for (size_t i = 0; i < fields.size(); ++i) {
    if (i > 0) key += ",";
    key += std::string(fields[i].name) + "=" + std::to_string(values[i]);
  }
  return key;
}

namespace {

// The dtype as Python names it, which is how the table's JSON names it.
std::string python_dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    default: return c10::toString(dtype);  // no table entry names it: such a call runs ATen's
  }
}

}  // namespace

std::string fused_conv2d_shape_key(const at::Tensor& input, const std::optional<at::Tensor>& temb,
                                   const std::optional<at::Tensor>& residual,
                                   int64_t out_channels, int64_t kernel_size) {
  TORCH_CHECK(input.dim() == 4, "pyevo::fused_conv2d: input must be 4-D, got ", input.dim(), "-D");
  // channels_last as the op's output-layout rule reads the input.
  const bool channels_last = fused_conv2d_memory_format(input) == at::MemoryFormat::ChannelsLast;
  return shape_key("fused_conv2d", python_dtype_name(input.scalar_type()),
                   {input.size(0), input.size(1), out_channels, input.size(2), input.size(3),
                    kernel_size, temb.has_value(), residual.has_value(), channels_last});
}

std::string shared_attention_shape_key(const at::Tensor& hidden_states,
                                       const std::optional<at::Tensor>& encoder_hidden_states,
                                       int64_t heads, int64_t head_dim) {
  TORCH_CHECK(hidden_states.dim() == 3, "pyevo::shared_attention: hidden_states must be (B, S, C)");
  const bool cross = encoder_hidden_states.has_value();
  TORCH_CHECK(!cross || encoder_hidden_states->dim() == 3,
              "pyevo::shared_attention: encoder_hidden_states must be (B, S_kv, C_kv)");
  const at::Tensor& context = cross ? *encoder_hidden_states : hidden_states;
  return shape_key("shared_attention", python_dtype_name(hidden_states.scalar_type()),
                   {hidden_states.size(0), hidden_states.size(1), hidden_states.size(2), heads,
                    head_dim, cross, context.size(1), context.size(2)});
}

// ---- The measured table

namespace {

struct MeasuredTable {
  // device + '\n' + capability + '\n' + shape key -> kernel ('\n' is in none of them)
  std::unordered_map<std::string, Kernel> choices;
  // The ops with at least one entry: for the others no call builds a key.
  std::unordered_set<std::string> ops;
};

std::string table_key(const std::string& device, const std::string& capability,
                      const std::string& shape_key) {
  return device + "\n" + capability + "\n" + shape_key;
}

// Set once, never freed: a call in flight on another thread may be reading it.
std::atomic<const MeasuredTable*> installed_table{nullptr};

}  // namespace

void install_measured_choices(const std::vector<MeasuredChoice>& choices) {
  auto table = std::make_unique<MeasuredTable>();
  for (const auto& choice : choices) {
    const bool added =
        table->choices.emplace(table_key(choice.device, choice.capability, choice.shape_key),
                               choice.kernel)
            .second;
    TORCH_CHECK(added, "pyevo: two kernel choices for ", choice.device, " (", choice.capability,
                ") ", choice.shape_key);
    table->ops.insert(choice.shape_key.substr(0, choice.shape_key.find('|')));
  }
  const MeasuredTable* expected = nullptr;
  TORCH_CHECK(installed_table.compare_exchange_strong(expected, table.get()),
              "pyevo: the kernel-choice table is installed once, when pyevo.ops is imported");
  table.release();
}

Kernel measured_choice(const std::string& device, const std::string& capability,
                       const std::string& shape_key) {
  const MeasuredTable* table = installed_table.load();
  if (table == nullptr) return Kernel::kAten;
  const auto found = table->choices.find(table_key(device, capability, shape_key));
  return found == table->choices.end() ? Kernel::kAten : found->second;
}

namespace {

#ifdef PYEVO_WITH_CUDA
struct DeviceIdentity {
  std::string name;
  std::string capability;
};

// The name and compute capability of a CUDA device, as torch.cuda names them; looked up once
// per device.
const DeviceIdentity& cuda_device_identity(c10::DeviceIndex index) {
  static std::mutex mutex;
  static std::unordered_map<c10::DeviceIndex, DeviceIdentity> identities;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = identities.find(index);
  if (found == identities.end()) {
    cudaDeviceProp properties{};
    const cudaError_t status = cudaGetDeviceProperties(&properties, index);
    TORCH_CHECK(status == cudaSuccess, "pyevo: cannot read the properties of CUDA device ", index,
                ": ", cudaGetErrorString(status));
    found = identities
                .emplace(index, DeviceIdentity{properties.name,
                                               std::to_string(properties.major) + "." +
                                                   std::to_string(properties.minor)})
                .first;
  }
  return found->second;
}
#endif

}  // namespace

ResolvedKernel resolve_kernel(KernelRequest request, const c10::Device& device, const char* op,
                              const std::function<std::string()>& shape_key) {
  if (!device.is_cuda()) {
    return {Kernel::kAten, "the kernel on this device is ATen's (one implementation)"};
  }
  if (request == KernelRequest::kAten) return {Kernel::kAten, "impl='aten' asked for it"};
  if (request == KernelRequest::kPyevo) return {Kernel::kPyevo, "impl='pyevo' asked for it"};
  constexpr const char* no_entry =
      "impl='auto' and the measured table (pyevo/assets/kernel_choices.json) has no entry for "
      "this GPU and shape: ATen's is the default";
  const MeasuredTable* table = installed_table.load();
  if (table == nullptr || table->ops.count(op) == 0) return {Kernel::kAten, no_entry};
#ifdef PYEVO_WITH_CUDA
  int index = device.index();
  if (index < 0) cudaGetDevice(&index);  // "cuda" without an index: the current device
  const DeviceIdentity& identity = cuda_device_identity(static_cast<c10::DeviceIndex>(index));
  const auto found = table->choices.find(table_key(identity.name, identity.capability, shape_key()));
  if (found == table->choices.end()) return {Kernel::kAten, no_entry};
  return {found->second, found->second == Kernel::kPyevo
                             ? "impl='auto': the measured table chose pyevo's for this GPU and shape"
                             : "impl='auto': the measured table chose ATen's for this GPU and shape"};
#else
  return {Kernel::kAten, no_entry};  // not reached: a build without CUDA has no CUDA tensors
#endif
}

}  // namespace pyevo
