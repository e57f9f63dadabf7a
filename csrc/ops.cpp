// The op schemas of the pyevo library, defined once. Kernels are registered per dispatch key
// next to their implementations (csrc/cpu/, csrc/cuda/); fake (meta) kernels and autograd
// formulas are registered in Python (pyevo/ops.py).
//
// Conventions shared by all ops:
//  * "Shared" parameters are the supernet's full-size tensors; an op uses a prefix (and, for
//    conv, a centred crop) of them in place, and its backward returns gradients of the FULL
//    shared shapes with zeros outside the part that was used.
//  * Outputs are always contiguous and never alias an input.
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
      "Tensor out_weight, Tensor? out_bias, int heads, int head_dim) -> Tensor");
  // Returns the 10 gradients in the order of the tensor inputs of shared_attention:
  // hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
  // out_weight, out_bias.
  m.def(
      "shared_attention_backward(Tensor grad_output, Tensor hidden_states, "
      "Tensor? encoder_hidden_states, Tensor q_weight, Tensor? q_bias, Tensor k_weight, "
      "Tensor? k_bias, Tensor v_weight, Tensor? v_bias, Tensor out_weight, Tensor? out_bias, "
      "int heads, int head_dim) -> Tensor[]");
}
