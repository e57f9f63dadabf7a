// The op schemas of the pyevo library, defined once. Kernels are registered per dispatch key
// next to their implementations (csrc/cpu/, csrc/cuda/); fake (meta) kernels and autograd
// formulas are registered in Python (pyevo/ops.py).
//
// Conventions shared by all ops:
//  * "Shared" parameters are the supernet's full-size tensors; an op uses a prefix (and, for
//    conv, a centred crop) of them in place, and its backward returns gradients of the FULL
//    shared shapes with zeros outside the part that was used.
//  * Outputs are always contiguous (fused_conv2d: dense in its input's memory format, see there)
//    and never alias an input.
//  * Backward ops return a fixed number of tensors. A gradient that does not exist (an absent
//    optional input) or was not asked for (output_mask false) comes back as an empty tensor of
//    shape (0,); pyevo/ops.py maps it to None.
#include <torch/library.h>

TORCH_LIBRARY(pyevo, m) {
  // Makes torch point users at the module that holds the fake and autograd registrations
  // when they call an op without having imported it.
  m.set_python_module("pyevo.ops");

  m.def(
      "shared_conv2d(Tensor input, Tensor weight, Tensor? bias, int out_channels, "
      "int kernel_size, int stride=1) -> Tensor");
  m.def(
      "shared_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, "
      "int out_channels, int kernel_size, int stride, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // The convolution of a diffusers ResnetBlock2D with the epilogue that cuDNN leaves to separate
  // kernels, at stride 1 (padding kernel_size // 2), reading the weight like shared_conv2d:
  //   out = (conv(input, weight[:out_channels, :C_in, crop]) + bias[:out_channels]
  //          + temb[:, :out_channels, None, None] + residual) * scale
  // temb (N, >= out_channels), residual (N, out_channels, H, W) and bias are each optional
  // (conv1 of a resnet: bias + temb; conv2: bias + residual, scale 1 / output_scale_factor).
  // The one exception to "outputs are contiguous": the output is dense in the input's layout,
  // channels_last for a channels_last input (the CUDA kernel computes in NHWC), contiguous
  // otherwise. No backward op of its own: its autograd formula (pyevo/ops.py) calls
  // shared_conv2d_backward.
  // `kernel` ("auto", "aten", "pyevo"): which CUDA implementation runs, here and in
  // shared_attention, the two ops that have both ATen's and pyevo's (csrc/cuda_kernel_choice.h);
  // "auto" follows the measured table. The CPU kernels validate it and have one implementation.
  m.def(
      "fused_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor? temb, Tensor? residual, "
      "float scale, int out_channels, int kernel_size, str impl=\"auto\") -> Tensor");

  m.def(
      "shared_group_norm_silu(Tensor input, Tensor weight, Tensor bias, int channels_per_group, "
      "float eps) -> Tensor");
  m.def(
      "shared_group_norm_silu_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor bias, int channels_per_group, float eps) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  m.def(
      "shared_attention(Tensor hidden_states, Tensor? encoder_hidden_states, Tensor q_weight, "
      "Tensor? q_bias, Tensor k_weight, Tensor? k_bias, Tensor v_weight, Tensor? v_bias, "
      "Tensor out_weight, Tensor? out_bias, int heads, int head_dim, str impl=\"auto\") "
      "-> Tensor");
  // Returns the 10 gradients in the order of the tensor inputs of shared_attention:
  // hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
  // out_weight, out_bias.
  m.def(
      "shared_attention_backward(Tensor grad_output, Tensor hidden_states, "
      "Tensor? encoder_hidden_states, Tensor q_weight, Tensor? q_bias, Tensor k_weight, "
      "Tensor? k_bias, Tensor v_weight, Tensor? v_bias, Tensor out_weight, Tensor? out_bias, "
      "int heads, int head_dim) -> Tensor[]");

  // Population ops: K candidates of one layer in one call (one kernel launch on CUDA), for the
  // search's batched evaluation. Forward only (the search evaluates candidates, it does not train
  // them): their autograd formula raises. Candidate i's output is the single op's output for
  // candidate i's arguments; on the CPU they are exactly a loop over the single op.
  //  * population_conv2d: `inputs` holds one tensor shared by every candidate (a block's first
  //    layer) or one per candidate. Candidate i reads the first in_channels[i] channels of its
  //    input (all of them when in_channels is empty) and computes
  //    shared_conv2d(input[:, :in_channels[i]], weight, bias, out_channels[i], kernel_sizes[i],
  //    stride).
  m.def(
      "population_conv2d(Tensor[] inputs, Tensor weight, Tensor? bias, int[] in_channels, "
      "int[] out_channels, int[] kernel_sizes, int stride=1) -> Tensor[]");
  //  * population_group_norm_silu: shared_group_norm_silu of every input (each its own channel
  //    count) with the same shared affine parameters.
  m.def(
      "population_group_norm_silu(Tensor[] inputs, Tensor weight, Tensor bias, "
      "int channels_per_group, float eps) -> Tensor[]");
  //  * population_attention: self-attention; candidate i keeps the first heads[i] heads.
  //    `hidden_states` holds one (B, S, C) tensor shared by every candidate or one per candidate
  //    (all with the same batch size B).
  m.def(
      "population_attention(Tensor[] hidden_states, Tensor q_weight, Tensor? q_bias, "
      "Tensor k_weight, Tensor? k_bias, Tensor v_weight, Tensor? v_bias, Tensor out_weight, "
      "Tensor? out_bias, int[] heads, int head_dim) -> Tensor[]");
}
