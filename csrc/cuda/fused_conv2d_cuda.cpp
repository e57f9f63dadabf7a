// CUDA kernel of pyevo::fused_conv2d: the Hopper CUTLASS convolution with the resnet epilogue
// fused (kernels/fused_conv2d_sm90.h) where it applies, else the composite of the CPU kernel
// (cuDNN convolution, then the epilogue as ATen ops).
//
// The CUTLASS kernel runs when all of these hold:
//  * the call's `kernel` argument is "pyevo", or "auto" (the default) and the measured table
//    chose pyevo's for this GPU and shape (csrc/cuda_kernel_choice.h). Without an entry "auto"
//    runs the composite: a kernel runs by default where a GPU measured it faster than cuDNN (the
//    rule every op follows: experiments/device/README.md);
//  * the extension was built with it (setup.py found the CUTLASS headers and built sm_90a:
//    PYEVO_WITH_CUTLASS_SM90), the device is compute capability 9.0, the dtype bfloat16/float16;
//  * the shape suits its TMA descriptors: channel counts multiples of 8, 16-byte-aligned data
//    (kernels/fused_conv2d_sm90_kernel.cuh, layout_unsupported), and CUTLASS's can_implement.
//
// It computes in NHWC. Operands are used in place where their layout already is that:
//  * input: channels_last, or a channel prefix of a channels_last tensor; otherwise a
//    channels_last copy is made;
//  * weight: the crop weight[:out_channels, :C_in, c:c+k, c:c+k] is read in place when the shared
//    weight's channel stride is 1, i.e. the caller keeps it channels_last
//    (weight.contiguous(memory_format=torch.channels_last), once per search generation, say);
//    otherwise the crop is re-laid out into a small KRSC copy on every call;
//  * residual: channels_last with evenly spaced pixels, else a channels_last copy;
//  * temb: rows with unit column stride, else a contiguous copy; bias: contiguous prefix.
// The output is written channels_last; a contiguous input gets it back as a contiguous copy (the
// op's memory-format rule), so a channels_last network avoids every copy.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <string>

#include "checks.h"
#include "composite_kernels.h"
#include "cuda/fused_conv2d_cuda.h"
#include "cuda_kernel_choice.h"

#ifdef PYEVO_WITH_CUTLASS_SM90
#include "fused_conv2d_sm90.h"
#endif

namespace pyevo {
namespace {

constexpr const char* kOp = "pyevo::fused_conv2d";

#ifdef PYEVO_WITH_CUTLASS_SM90

// The operands in the layouts the CUTLASS kernel reads, the output it writes, and the problem
// that describes them. The tensors keep any copies alive until the launch is enqueued.
struct PreparedFusedConv {
  at::Tensor input;
  at::Tensor weight;
  at::Tensor bias;
  at::Tensor temb;
  at::Tensor residual;
  at::Tensor output;
  cuda::FusedConvProblem problem{};
};

// (N, C, H, W) stored as NHWC, possibly with room between channels-vectors, rows or images (a
// channel prefix of a wider tensor, a crop of a larger kernel): what the TMA descriptors take.
bool is_nhwc_nested(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(3) >= t.size(1) && t.stride(2) >= t.size(3) * t.stride(3) &&
         t.stride(0) >= t.size(2) * t.stride(2);
}

// NHWC with pixels evenly spaced over (h, w) and images: one pixel stride describes it.
bool has_nhwc_pixels(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(3) >= t.size(1) && t.stride(2) == t.size(3) * t.stride(3) &&
         t.stride(0) == t.size(2) * t.stride(2);
}

PreparedFusedConv prepare(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& temb,
                          const std::optional<at::Tensor>& residual, double scale,
                          int64_t out_channels, int64_t kernel_size) {
  PreparedFusedConv prepared;
  cuda::FusedConvProblem& p = prepared.problem;
  const int64_t in_channels = input.size(1);

  prepared.input =
      is_nhwc_nested(input) ? input : input.contiguous(at::MemoryFormat::ChannelsLast);
  p.input = prepared.input.const_data_ptr();
  p.input_stride[0] = prepared.input.stride(0);
  p.input_stride[1] = prepared.input.stride(2);
  p.input_stride[2] = prepared.input.stride(3);

  const at::Tensor crop = shared_conv2d_sub_weight(weight, in_channels, out_channels, kernel_size);
  prepared.weight = is_nhwc_nested(crop) ? crop : crop.contiguous(at::MemoryFormat::ChannelsLast);
  p.weight = prepared.weight.const_data_ptr();
  p.weight_stride[0] = prepared.weight.stride(0);
  p.weight_stride[1] = prepared.weight.stride(2);
  p.weight_stride[2] = prepared.weight.stride(3);

  if (bias.has_value()) {
    prepared.bias = bias->narrow(0, 0, out_channels).contiguous();
    p.bias = prepared.bias.const_data_ptr();
  }
  if (temb.has_value()) {
    prepared.temb = temb->stride(1) == 1 ? *temb : temb->contiguous();
    p.temb = prepared.temb.const_data_ptr();
    p.temb_stride = prepared.temb.stride(0);
  }
  if (residual.has_value()) {
    prepared.residual = has_nhwc_pixels(*residual)
                            ? *residual
                            : residual->contiguous(at::MemoryFormat::ChannelsLast);
    p.residual = prepared.residual.const_data_ptr();
    p.residual_stride = prepared.residual.stride(3);
  }

  prepared.output = at::empty({input.size(0), out_channels, input.size(2), input.size(3)},
                              input.options().memory_format(at::MemoryFormat::ChannelsLast));
  p.output = prepared.output.mutable_data_ptr();
  p.scale = static_cast<float>(scale);
  p.batch = static_cast<int>(input.size(0));
  p.height = static_cast<int>(input.size(2));
  p.width = static_cast<int>(input.size(3));
  p.in_channels = static_cast<int>(in_channels);
  p.out_channels = static_cast<int>(out_channels);
  p.kernel_size = static_cast<int>(kernel_size);
  return prepared;
}

int compute_capability(const at::Device& device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index()) !=
          cudaSuccess) {
    cudaGetLastError();  // clear the error; the caller falls back
    return 0;
  }
  return major * 10 + minor;
}

#else

struct PreparedFusedConv {};  // no CUTLASS kernel in this build: nothing to prepare

#endif  // PYEVO_WITH_CUTLASS_SM90

// Empty when the CUTLASS kernel can take the call (and then `prepared` holds it), else why not.
// Arguments already validated.
std::string cutlass_unsupported([[maybe_unused]] const at::Tensor& input,
                                [[maybe_unused]] const at::Tensor& weight,
                                [[maybe_unused]] const std::optional<at::Tensor>& bias,
                                [[maybe_unused]] const std::optional<at::Tensor>& temb,
                                [[maybe_unused]] const std::optional<at::Tensor>& residual,
                                [[maybe_unused]] double scale,
                                [[maybe_unused]] int64_t out_channels,
                                [[maybe_unused]] int64_t kernel_size, KernelRequest request,
                                [[maybe_unused]] PreparedFusedConv& prepared) {
  const ResolvedKernel resolved =
      resolve_kernel(request, input.device(), "fused_conv2d", [&] {
        return fused_conv2d_shape_key(input, temb, residual, out_channels, kernel_size);
      });
  if (resolved.kernel == Kernel::kAten) return resolved.why;
#ifndef PYEVO_WITH_CUTLASS_SM90
  return "this build has no CUTLASS sm_90a kernel (no nvidia-cutlass headers, or 9.0 not among "
         "the CUDA archs)";
#else
  if (input.scalar_type() != at::kBFloat16 && input.scalar_type() != at::kHalf) {
    return std::string("dtype ") + c10::toString(input.scalar_type()) +
           " (the CUTLASS kernel takes bfloat16 and float16)";
  }
  const int capability = compute_capability(input.device());
  if (capability != 90) {
    return "the device is compute capability " + std::to_string(capability / 10) + "." +
           std::to_string(capability % 10) + ", the kernel needs 9.0";
  }
  if (input.numel() == 0) return "empty input";
  // The kernel's own first checks, here before any operand is copied into its layout.
  if (input.size(1) % 8 != 0) return "in_channels is not a multiple of 8";
  if (out_channels % 8 != 0) return "out_channels is not a multiple of 8";
  prepared = prepare(input, weight, bias, temb, residual, scale, out_channels, kernel_size);
  const auto dtype = input.scalar_type() == at::kBFloat16 ? cuda::FusedConvDtype::kBFloat16
                                                          : cuda::FusedConvDtype::kFloat16;
  const char* reason = cuda::fused_conv2d_sm90_unsupported(dtype, prepared.problem);
  return reason == nullptr ? std::string() : std::string(reason);
#endif
}

at::Tensor fused_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& temb,
                             const std::optional<at::Tensor>& residual, double scale,
                             int64_t out_channels, int64_t kernel_size, c10::string_view kernel) {
  const KernelRequest request =
      kernel_request_from_name(std::string_view(kernel.data(), kernel.size()), kOp);
  check_on_cuda(input, kOp);
  check_fused_conv2d(input, weight, bias, temb, residual, scale, out_channels, kernel_size);
  const c10::cuda::CUDAGuard device_guard(input.device());
#ifdef PYEVO_WITH_CUTLASS_SM90
  PreparedFusedConv prepared;
  if (cutlass_unsupported(input, weight, bias, temb, residual, scale, out_channels, kernel_size,
                          request, prepared)
          .empty()) {
    const auto dtype = input.scalar_type() == at::kBFloat16 ? cuda::FusedConvDtype::kBFloat16
                                                            : cuda::FusedConvDtype::kFloat16;
    const char* error = cuda::fused_conv2d_sm90_run(dtype, prepared.problem,
                                                    c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(error == nullptr, kOp, ": the CUTLASS kernel failed: ", error);
    return prepared.output.contiguous(fused_conv2d_memory_format(input));
  }
#else
  (void)request;  // no CUTLASS kernel in this build: every request runs the composite
#endif
  return fused_conv2d_composite(input, weight, bias, temb, residual, scale, out_channels,
                                kernel_size);
}

}  // namespace

std::string fused_conv2d_cuda_kernel(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& temb,
                                     const std::optional<at::Tensor>& residual,
                                     int64_t out_channels, int64_t kernel_size,
                                     KernelRequest request) {
  check_on_cuda(input, kOp);
  check_fused_conv2d(input, weight, bias, temb, residual, 1.0, out_channels, kernel_size);
  const c10::cuda::CUDAGuard device_guard(input.device());
  PreparedFusedConv prepared;
  const std::string reason = cutlass_unsupported(input, weight, bias, temb, residual, 1.0,
                                                 out_channels, kernel_size, request, prepared);
  return reason.empty() ? "cutlass_sm90" : "aten: " + reason;
}

TORCH_LIBRARY_IMPL(pyevo, CUDA, m) { m.impl("fused_conv2d", &fused_conv2d_cuda); }

}  // namespace pyevo
