// Which implementation runs a call of the two CUDA ops that have both ATen's and pyevo's:
//  * shared_attention (forward): the SDPA composite, or pyevo's fused attention
//    (kernels/flash_attention.cu);
//  * fused_conv2d: cuDNN then the epilogue as ATen ops, or the CUTLASS sm_90a kernel where it
//    applies (csrc/cuda/fused_conv2d_cuda.cpp).
// Every other op has one implementation per device. The caller says which through the two ops'
// trailing `kernel` argument: "aten" and "pyevo" force one; "auto" (the default) takes the
// measured table's entry for the GPU and the call's exact shape key, ATen's where there is none.
// The table is pyevo/assets/kernel_choices.json: pyevo/kernel_choices.py reads it and installs it
// here once, when pyevo.ops is imported; nothing changes it afterwards, so a call's implementation
// depends on its arguments and its GPU only, never on process-wide state set by someone else.
// The CPU kernels accept and validate the argument; they have one implementation (ATen's).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace pyevo {

// What a call asks for (the ops' `kernel` argument).
enum class KernelRequest { kAuto, kAten, kPyevo };
// What runs.
enum class Kernel { kAten, kPyevo };

// "auto" / "aten" / "pyevo"; another name is a TORCH_CHECK error that names `op` and lists them.
KernelRequest kernel_request_from_name(std::string_view name, const char* op);
const char* kernel_name(Kernel kernel);

// ---- Shape keys: one format for the table's entries (built from their JSON fields through
// pyevo._C._kernel_choice_shape_key) and for the calls (built from their arguments), so that an
// entry matches exactly the calls it was measured for.

struct ShapeKeyField {
  const char* name;
  bool is_flag;  // true/false in the JSON, 1/0 in the key
};
// The fields of `op`'s shape key, in key order; TORCH_CHECK error for an op without choices.
//   fused_conv2d: N, C_in, C_out, H, W, kernel_size, has_temb, has_residual, channels_last
//   shared_attention: B, S, C, heads, head_dim, cross, S_kv, C_kv (self-attention: S, C)
const std::vector<ShapeKeyField>& shape_key_fields(const std::string& op);
// "op|dtype|name=value,...", dtype as Python names it ("bfloat16", "float16", ...).
std::string shape_key(const std::string& op, const std::string& dtype,
                      const std::vector<int64_t>& values);
std::string fused_conv2d_shape_key(const at::Tensor& input, const std::optional<at::Tensor>& temb,
                                   const std::optional<at::Tensor>& residual,
                                   int64_t out_channels, int64_t kernel_size);
std::string shared_attention_shape_key(const at::Tensor& hidden_states,
                                       const std::optional<at::Tensor>& encoder_hidden_states,
                                       int64_t heads, int64_t head_dim);

// ---- The measured table.

struct MeasuredChoice {
  std::string device;      // torch.cuda.get_device_name
  std::string capability;  // "9.0"
  std::string shape_key;
  Kernel kernel;
};
// Installs the table; once per process (a second call is an error: the table is not a switch).
void install_measured_choices(const std::vector<MeasuredChoice>& choices);
// The installed table's kernel for this GPU and shape key; ATen's without an entry.
Kernel measured_choice(const std::string& device, const std::string& capability,
                       const std::string& shape_key);

// The implementation a call of `op` ("fused_conv2d", "shared_attention") on `device` runs, and
// why (a static string, for the introspection functions). `shape_key` is called only when the
// table has entries for `op` and the request is "auto" on a CUDA device.
struct ResolvedKernel {
  Kernel kernel;
  const char* why;
};
ResolvedKernel resolve_kernel(KernelRequest request, const c10::Device& device, const char* op,
                              const std::function<std::string()>& shape_key);

}  // namespace pyevo
