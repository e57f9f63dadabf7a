"""The ``torch.ops.pyevo`` ops: layers that run on a slice of a supernet's shared parameters.

The schemas and the CPU/CUDA kernels live in C++ (``csrc/``); this module registers what
``torch.compile`` and autograd need on top of them:

* fake (meta) kernels, which compute output shapes without touching data;
* autograd formulas, which call the ops' own backward ops (``pyevo::*_backward``). The gradients
  of shared parameters always have the FULL shared shape, with zeros outside the slice the call
  used: several sub-networks that share one weight then simply add their gradients into it.

It also exposes typed wrappers (:func:`shared_conv2d`, :func:`fused_conv2d` (a resnet conv with
bias, time embedding, residual and scale fused), :func:`shared_group_norm_silu`,
:func:`shared_attention`, and the population ops :func:`population_conv2d`,
:func:`population_group_norm_silu`, :func:`population_attention`). ``import pyevo`` imports this
module, so ``torch.ops.pyevo.*`` is fully usable after it.

The population ops evaluate K candidates of one layer in one call (on CUDA one kernel launch for
GroupNorm+SiLU and the attention cores, a loop of cuDNN calls for the convolution) for the search,
which scores candidates and never trains them: they are **forward only**. Their autograd formula
raises a clear error if a gradient is ever asked for (train a candidate through the
single-candidate ops instead).

Which kernels run on CUDA: the convolutions (:func:`shared_conv2d`, :func:`population_conv2d`)
run ATen's convolution (cuDNN) on the weight view, GroupNorm+SiLU and the population attention
pyevo's kernels. :func:`shared_attention` and :func:`fused_conv2d` have both, and a trailing
``impl`` argument says which, per call: ``"aten"`` (SDPA; cuDNN and the epilogue as separate
ops), ``"pyevo"`` (pyevo's fused attention; the CUTLASS conv where it applies) or ``"auto"`` (the
default): the measured table's choice for the GPU and the call's exact shape, ATen's where the table
has no entry (:mod:`pyevo.kernel_choices`; the table, :data:`KERNEL_CHOICES`, is loaded once at
import and nothing changes it). :func:`kernel_choice` answers which one a call runs. The CPU ops
validate ``impl`` and have one implementation.

Under ``torch.autocast`` the ops follow ATen's policy for their ATen counterparts: the convolutions
and attentions run in the autocast dtype (like ``conv2d`` and SDPA), GroupNorm+SiLU in float32
(like ``group_norm`` under CUDA autocast, on every device); the dtype is read from the autocast
context at each call.

Conventions of the backward ops: they return a fixed number of tensors; a gradient that does not
exist (an absent optional input) or was not asked for comes back as an empty ``(0,)`` tensor,
which the autograd formulas below turn into ``None``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from pyevo import _C  # noqa: F401  (loads the library that defines the ops)
from pyevo.kernel_choices import KERNEL_REQUESTS, SHIPPED_TABLE, cuda_device_identity, load_kernel_choices

__all__ = ["shared_conv2d", "fused_conv2d", "shared_group_norm_silu", "shared_attention", "population_conv2d",
           "population_group_norm_silu", "population_attention", "KERNEL_CHOICES", "kernel_choice",
           "kernel_choice_digest"]


# ---------------------------------------------------------------------------------------------
# Which implementation the two ops with both run on CUDA: the measured table
# ---------------------------------------------------------------------------------------------

#: The measured kernel-choice table (``pyevo/assets/kernel_choices.json``), loaded once here and
#: installed in the C++ ops, which look up every ``impl="auto"`` call of :func:`fused_conv2d` and
#: :func:`shared_attention` on CUDA in it.
KERNEL_CHOICES = load_kernel_choices(SHIPPED_TABLE)
_C._install_kernel_choices([(device, capability, key, kernel)
                            for (device, capability, key), kernel in KERNEL_CHOICES.choices.items()])


def _call_shape_key(op: str, args: Sequence) -> tuple[torch.device, str]:
    """The device and the C++ shape key of a call of ``op`` with ``args`` (its arguments before
    ``impl``)."""
    if op == "fused_conv2d":
        input, _weight, _bias, temb, residual, _scale, out_channels, kernel_size = args
        return input.device, _C._fused_conv2d_shape_key(input, temb, residual, out_channels, kernel_size)
    if op == "shared_attention":
        hidden_states, encoder_hidden_states, *_projections, heads, head_dim = args
        return hidden_states.device, _C._shared_attention_shape_key(hidden_states, encoder_hidden_states,
                                                                    heads, head_dim)
    raise ValueError(f"no kernel choice for op '{op}' (expected 'fused_conv2d' or 'shared_attention')")


def kernel_choice(op: str, *args, impl: str = "auto") -> str:
    """Which implementation ``torch.ops.pyevo.<op>(*args, impl=impl)`` runs: ``"aten"`` or
    ``"pyevo"``, resolved as the op resolves it. ``op`` is ``"fused_conv2d"`` or
    ``"shared_attention"``; ``args`` are the op's arguments before ``impl``.

    On CUDA ``"aten"`` and ``"pyevo"`` are what they say, and ``"auto"`` is :data:`KERNEL_CHOICES`'s
    entry for the GPU and the call's shape, ``"aten"`` without one; on the CPU always ``"aten"`` (one
    implementation). Under ``"pyevo"`` :func:`fused_conv2d` still runs cuDNN and the epilogue where
    the CUTLASS kernel does not apply: ``pyevo._C._fused_conv2d_kernel(..., impl)`` says which
    kernel runs and why."""
    device, key = _call_shape_key(op, args)
    return _C._resolve_kernel(op, device, key, impl)


def kernel_choice_digest(device: torch.device | str) -> str:
    """A short name for the kernel choices :data:`KERNEL_CHOICES` makes on this CUDA device:
    ``"aten"`` where it has no entries for it, else a hash of them (a latency key's part, so that a
    changed table re-times)."""
    return KERNEL_CHOICES.digest(*cuda_device_identity(device))


def _check_kernel_request(op: str, impl: str) -> None:
    """The C++ ops' check of ``impl``, for fake tensors too."""
    torch._check(impl in KERNEL_REQUESTS, lambda: f"pyevo::{op}: unknown impl '{impl}' "
                                                    "(expected 'auto', 'aten' or 'pyevo')")


# ---------------------------------------------------------------------------------------------
# Typed wrappers
# ---------------------------------------------------------------------------------------------


def shared_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], out_channels: int,
                  kernel_size: int, stride: int = 1) -> Tensor:
    """2-D convolution with a sub-kernel of a shared weight, read in place.

    Equivalent to ``F.conv2d(input, weight[:out_channels, :C_in, c:c+k, c:c+k],
    bias[:out_channels], stride, padding=k // 2)`` with ``C_in = input.shape[1]``,
    ``k = kernel_size`` and ``c = (K - k) // 2`` (a centred crop), but without copying the slice.

    Args:
        input: ``(N, C_in, H, W)``.
        weight: the shared ``(C_out_max, C_in_max, K, K)`` weight, ``K`` odd, ``C_in <= C_in_max``.
        bias: the shared bias (at least ``out_channels`` entries) or ``None``.
        out_channels: output channels used, ``1 <= out_channels <= C_out_max``.
        kernel_size: odd kernel size, ``<= K``.
        stride: spatial stride (padding is always ``kernel_size // 2``).

    Returns:
        ``(N, out_channels, H_out, W_out)``, contiguous. Gradients w.r.t. ``weight`` and ``bias``
        have their full shared shapes, zero outside the slice used.
    """
    return torch.ops.pyevo.shared_conv2d.default(input, weight, bias, out_channels, kernel_size,
                                                 stride)


def fused_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], temb: Optional[Tensor],
                 residual: Optional[Tensor], scale: float, out_channels: int,
                 kernel_size: int, impl: str = "auto") -> Tensor:
    """A ``diffusers`` ResnetBlock2D convolution with its epilogue fused, on a shared weight.

    Equivalent to ``(shared_conv2d(input, weight, bias, out_channels, kernel_size)
    + temb[:, :out_channels, None, None] + residual) * scale`` (stride 1, padding
    ``kernel_size // 2``); ``bias``, ``temb`` and ``residual`` are each optional. A resnet's conv1
    is ``fused_conv2d(h, w1, b1, temb, None, 1.0, ...)``, its conv2 ``fused_conv2d(h, w2, b2, None,
    shortcut, 1 / output_scale_factor, ...)``.

    On CUDA, with ``impl="pyevo"`` (or ``"auto"`` where the measured table chose pyevo's for the
    GPU and shape), bfloat16/float16 calls on a Hopper GPU (compute capability 9.0) with channel
    counts that are multiples of 8 run one CUTLASS kernel (TMA im2col, GMMA) whose epilogue adds
    bias, temb and the residual and scales before its one store; every other call runs cuDNN and
    then the epilogue as separate ATen ops (``pyevo._C._fused_conv2d_kernel`` says which, and why). The kernel computes in channels_last: pass channels_last activations, and keep the
    shared weight channels_last (``weight.contiguous(memory_format=torch.channels_last)``, once,
    e.g. per search generation) so that its crop is read in place rather than re-laid out on every
    call.

    Args:
        input: ``(N, C_in, H, W)``.
        weight: the shared ``(C_out_max, C_in_max, K, K)`` weight, ``K`` odd.
        bias: the shared bias (at least ``out_channels`` entries) or ``None``.
        temb: ``(N, >= out_channels)`` (its first ``out_channels`` columns are added) or ``None``.
        residual: ``(N, out_channels, H, W)`` or ``None``.
        scale: multiplies the sum.
        out_channels, kernel_size: as in :func:`shared_conv2d`.
        impl: ``"auto"`` (the measured table's choice, ATen's without an entry), ``"aten"`` or
            ``"pyevo"``: which CUDA implementation runs (see the module's docstring).

    Returns:
        ``(N, out_channels, H, W)``, dense: channels_last when ``input`` is channels_last,
        contiguous otherwise. Differentiable (through ``shared_conv2d``'s backward); gradients of
        ``weight``, ``bias`` and ``temb`` have their full shapes, zero outside the part used.
    """
    return torch.ops.pyevo.fused_conv2d.default(input, weight, bias, temb, residual, scale,
                                                out_channels, kernel_size, impl)


def shared_group_norm_silu(input: Tensor, weight: Tensor, bias: Tensor, channels_per_group: int,
                           eps: float) -> Tensor:
    """``silu(group_norm(input))`` with the first ``C`` entries of shared affine parameters.

    Equivalent to ``F.silu(F.group_norm(input, C // channels_per_group, weight[:C], bias[:C],
    eps))`` with ``C = input.shape[1]``; one fused kernel. The number of channels per group stays
    fixed as the width changes, so narrower layers have fewer groups.

    Args:
        input: ``(N, C, *spatial)``, ``C % channels_per_group == 0``.
        weight, bias: 1-D shared affine parameters with at least ``C`` entries.
        channels_per_group: channels in each normalisation group.
        eps: added to the variance.

    Returns:
        A contiguous tensor of the input's shape. Gradients w.r.t. ``weight`` and ``bias`` have
        their full shared length, zero beyond ``C``.
    """
    return torch.ops.pyevo.shared_group_norm_silu.default(input, weight, bias, channels_per_group,
                                                          eps)


def shared_attention(hidden_states: Tensor, encoder_hidden_states: Optional[Tensor],
                     q_weight: Tensor, q_bias: Optional[Tensor], k_weight: Tensor,
                     k_bias: Optional[Tensor], v_weight: Tensor, v_bias: Optional[Tensor],
                     out_weight: Tensor, out_bias: Optional[Tensor], heads: int,
                     head_dim: int, impl: str = "auto") -> Tensor:
    """Multi-head attention over the first ``heads`` heads of shared projections.

    Queries come from ``hidden_states``; keys and values from ``encoder_hidden_states`` when
    given, else from ``hidden_states``. With ``I = heads * head_dim``, the projections use
    ``q/k/v_weight[:I]`` (``nn.Linear`` layout, ``(H_max * head_dim, in_features)``),
    ``q/k/v_bias[:I]``, ``out_weight[:, :I]`` and the whole ``out_bias``; the attention is
    ``softmax(Q K^T / sqrt(head_dim)) V`` per head, heads merged before the output projection.

    Args:
        hidden_states: ``(B, S, C)``.
        encoder_hidden_states: ``(B, S_kv, C_kv)`` or ``None`` (self-attention).
        q_weight: ``(>= I, C)``; k_weight, v_weight: ``(>= I, C_kv)``.
        q_bias, k_bias, v_bias: ``(>= I)`` or ``None``.
        out_weight: ``(C, >= I)``; out_bias: ``(C)`` or ``None``.
        heads: heads used; head_dim: channels per head.
        impl: ``"auto"`` (the measured table's choice, ATen's without an entry), ``"aten"`` (SDPA)
            or ``"pyevo"`` (pyevo's fused attention): which CUDA forward runs (see the module's
            docstring). The backward is the same for all three.

    Returns:
        ``(B, S, C)``, contiguous. Gradients w.r.t. the shared projections have their full
        shapes, zero outside the rows/columns used.
    """
    return torch.ops.pyevo.shared_attention.default(
        hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
        out_weight, out_bias, heads, head_dim, impl)


def population_conv2d(inputs: Sequence[Tensor], weight: Tensor, bias: Optional[Tensor],
                      in_channels: Sequence[int], out_channels: Sequence[int],
                      kernel_sizes: Sequence[int], stride: int = 1) -> list[Tensor]:
    """:func:`shared_conv2d` for K candidates of one layer at once (forward only).

    Candidate ``i`` computes ``shared_conv2d(x[:, :in_channels[i]], weight, bias,
    out_channels[i], kernel_sizes[i], stride)`` where ``x`` is ``inputs[0]`` (one input shared by
    every candidate, a block's first layer) or ``inputs[i]`` (one input per candidate). An empty
    ``in_channels`` means every candidate reads all of its input's channels. This is a loop over
    :func:`shared_conv2d` (ATen's convolution: cuDNN on CUDA): pyevo's one-launch grouped conv was
    slower than that loop on an H100 and was removed. Work shared between candidates (one conv
    per kernel size at a block's first layer) is up to the caller: ``pyevo.search.population``.

    Returns:
        K contiguous tensors ``(N, out_channels[i], H_out_i, W_out_i)``.
    """
    return torch.ops.pyevo.population_conv2d.default(list(inputs), weight, bias, list(in_channels),
                                                     list(out_channels), list(kernel_sizes),
                                                     stride)


def population_group_norm_silu(inputs: Sequence[Tensor], weight: Tensor, bias: Tensor,
                               channels_per_group: int, eps: float) -> list[Tensor]:
    """:func:`shared_group_norm_silu` of every input (each with its own channel count) with the
    same shared affine parameters; one launch on CUDA. Forward only.

    Returns:
        One contiguous tensor per input, of its shape.
    """
    return torch.ops.pyevo.population_group_norm_silu.default(list(inputs), weight, bias,
                                                              channels_per_group, eps)


def population_attention(hidden_states: Sequence[Tensor], q_weight: Tensor,
                         q_bias: Optional[Tensor], k_weight: Tensor, k_bias: Optional[Tensor],
                         v_weight: Tensor, v_bias: Optional[Tensor], out_weight: Tensor,
                         out_bias: Optional[Tensor], heads: Sequence[int],
                         head_dim: int) -> list[Tensor]:
    """Self-attention :func:`shared_attention` for K head-prefix candidates (forward only).

    Candidate ``i`` keeps the first ``heads[i]`` heads. ``hidden_states`` holds one ``(B, S, C)``
    tensor shared by every candidate, or one per candidate (same ``B``). With a shared input the
    CUDA op projects and attends once, for the most heads any candidate keeps (a head's output
    does not depend on the other heads), then runs one output projection per distinct head count;
    with per-candidate inputs every attention core runs in one launch.

    Returns:
        K contiguous ``(B, S, C)`` tensors.
    """
    return torch.ops.pyevo.population_attention.default(
        list(hidden_states), q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight,
        out_bias, list(heads), head_dim)


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels: output metadata only. The real kernels validate their inputs; these
# check what the output shapes depend on, so a bad call fails at trace time too.
# ---------------------------------------------------------------------------------------------


def _absent_gradient(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _check_like(op: str, reference_name: str, reference: Tensor, **tensors) -> None:
    """What the C++ kernels check first (csrc/checks.cpp, check_like), for fake tensors too, so a
    traced or compiled call fails as an eager one does: every tensor argument (a list: each of its
    tensors) on the main input's device and of its dtype."""
    for name, value in tensors.items():
        items = [(name, value)] if not isinstance(value, (list, tuple)) else [
            (f"{name}[{i}]", item) for i, item in enumerate(value)]
        for label, tensor in items:
            if tensor is None:
                continue
            torch._check(tensor.device == reference.device,
                         lambda: f"pyevo::{op}: {label} is on {tensor.device} but {reference_name} is on "
                                 f"{reference.device}; all tensor arguments must be on the same device")
            torch._check(tensor.dtype == reference.dtype,
                         lambda: f"pyevo::{op}: {label} has dtype {tensor.dtype} but {reference_name} has "
                                 f"dtype {reference.dtype}; all tensor arguments must have the same dtype")


def _conv2d_output_size(size, kernel_size: int, stride: int):
    return (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1


@torch.library.register_fake("pyevo::shared_conv2d")
def _shared_conv2d_fake(input, weight, bias, out_channels, kernel_size, stride=1):
    _check_like("shared_conv2d", "input", input, weight=weight, bias=bias)
    torch._check(input.dim() == 4, lambda: f"pyevo::shared_conv2d: input must be 4-D, got "
                                           f"{input.dim()}-D")
    torch._check(weight.dim() == 4, lambda: f"pyevo::shared_conv2d: weight must be 4-D, got "
                                            f"{weight.dim()}-D")
    torch._check(kernel_size % 2 == 1 and kernel_size <= weight.shape[2],
                 lambda: f"pyevo::shared_conv2d: kernel_size must be odd and <= "
                         f"{weight.shape[2]}, got {kernel_size}")
    torch._check(out_channels <= weight.shape[0] and input.shape[1] <= weight.shape[1],
                 lambda: "pyevo::shared_conv2d: width larger than the shared weight")
    return input.new_empty((input.shape[0], out_channels,
                            _conv2d_output_size(input.shape[2], kernel_size, stride),
                            _conv2d_output_size(input.shape[3], kernel_size, stride)))


def _fused_conv2d_memory_format(input: Tensor) -> torch.memory_format:
    """The C++ kernels' rule (csrc/composite_kernels.cpp, fused_conv2d_memory_format)."""
    channels_last = (input.is_contiguous(memory_format=torch.channels_last)
                     and not input.is_contiguous())
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.library.register_fake("pyevo::fused_conv2d")
def _fused_conv2d_fake(input, weight, bias, temb, residual, scale, out_channels, kernel_size,
                       impl="auto"):
    _check_kernel_request("fused_conv2d", impl)
    _check_like("fused_conv2d", "input", input, weight=weight, bias=bias, temb=temb,
                residual=residual)
    torch._check(input.dim() == 4 and weight.dim() == 4,
                 lambda: "pyevo::fused_conv2d: input and weight must be 4-D")
    torch._check(kernel_size % 2 == 1 and kernel_size <= weight.shape[2],
                 lambda: f"pyevo::fused_conv2d: kernel_size must be odd and <= {weight.shape[2]}, "
                         f"got {kernel_size}")
    torch._check(out_channels <= weight.shape[0] and input.shape[1] <= weight.shape[1],
                 lambda: "pyevo::fused_conv2d: width larger than the shared weight")
    shape = (input.shape[0], out_channels, input.shape[2], input.shape[3])
    torch._check(temb is None or (temb.dim() == 2 and temb.shape[0] == input.shape[0]
                                  and temb.shape[1] >= out_channels),
                 lambda: f"pyevo::fused_conv2d: temb must be (N, >= {out_channels})")
    torch._check(residual is None or tuple(residual.shape) == shape,
                 lambda: f"pyevo::fused_conv2d: residual must have shape {shape}")
    return torch.empty(shape, dtype=input.dtype, device=input.device,
                       memory_format=_fused_conv2d_memory_format(input))


@torch.library.register_fake("pyevo::shared_conv2d_backward")
def _shared_conv2d_backward_fake(grad_output, input, weight, bias, out_channels, kernel_size,
                                 stride, output_mask):
    _check_like("shared_conv2d_backward", "input", input, grad_output=grad_output, weight=weight, bias=bias)
    grad_input = input.new_empty(input.shape) if output_mask[0] else _absent_gradient(input)
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else _absent_gradient(input)
    grad_bias = (bias.new_empty(bias.shape) if output_mask[2] and bias is not None
                 else _absent_gradient(input))
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("pyevo::shared_group_norm_silu")
def _shared_group_norm_silu_fake(input, weight, bias, channels_per_group, eps):
    _check_like("shared_group_norm_silu", "input", input, weight=weight, bias=bias)
    torch._check(input.dim() >= 2, lambda: "pyevo::shared_group_norm_silu: input must be "
                                           "(N, C, *spatial)")
    torch._check(input.shape[1] % channels_per_group == 0,
                 lambda: f"pyevo::shared_group_norm_silu: {input.shape[1]} channels are not "
                         f"divisible by channels_per_group={channels_per_group}")
    return input.new_empty(input.shape)


@torch.library.register_fake("pyevo::shared_group_norm_silu_backward")
def _shared_group_norm_silu_backward_fake(grad_output, input, weight, bias, channels_per_group,
                                          eps):
    _check_like("shared_group_norm_silu_backward", "input", input, grad_output=grad_output, weight=weight,
                bias=bias)
    return input.new_empty(input.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


@torch.library.register_fake("pyevo::shared_attention")
def _shared_attention_fake(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight,
                           k_bias, v_weight, v_bias, out_weight, out_bias, heads, head_dim,
                           impl="auto"):
    _check_kernel_request("shared_attention", impl)
    _check_like("shared_attention", "hidden_states", hidden_states, encoder_hidden_states=encoder_hidden_states,
                q_weight=q_weight, q_bias=q_bias, k_weight=k_weight, k_bias=k_bias, v_weight=v_weight,
                v_bias=v_bias, out_weight=out_weight, out_bias=out_bias)
    torch._check(hidden_states.dim() == 3, lambda: "pyevo::shared_attention: hidden_states "
                                                   "must be (B, S, C)")
    inner = heads * head_dim
    torch._check(inner <= q_weight.shape[0] and inner <= out_weight.shape[1],
                 lambda: f"pyevo::shared_attention: heads * head_dim = {inner} is larger than "
                         "the shared projections")
    return hidden_states.new_empty(hidden_states.shape)


@torch.library.register_fake("pyevo::shared_attention_backward")
def _shared_attention_backward_fake(grad_output, hidden_states, encoder_hidden_states, q_weight,
                                    q_bias, k_weight, k_bias, v_weight, v_bias, out_weight,
                                    out_bias, heads, head_dim):
    _check_like("shared_attention_backward", "hidden_states", hidden_states, grad_output=grad_output,
                encoder_hidden_states=encoder_hidden_states, q_weight=q_weight, q_bias=q_bias, k_weight=k_weight,
                k_bias=k_bias, v_weight=v_weight, v_bias=v_bias, out_weight=out_weight, out_bias=out_bias)

    def gradient_like(tensor):
        return tensor.new_empty(tensor.shape) if tensor is not None else _absent_gradient(
            hidden_states)

    return [gradient_like(t) for t in (hidden_states, encoder_hidden_states, q_weight, q_bias,
                                       k_weight, k_bias, v_weight, v_bias, out_weight, out_bias)]


@torch.library.register_fake("pyevo::population_conv2d")
def _population_conv2d_fake(inputs, weight, bias, in_channels, out_channels, kernel_sizes,
                            stride=1):
    count = len(out_channels)
    torch._check(count >= 1, lambda: "pyevo::population_conv2d: no candidates")
    torch._check(len(inputs) >= 1, lambda: "pyevo::population_conv2d: no inputs")
    _check_like("population_conv2d", "inputs[0]", inputs[0], inputs=inputs, weight=weight, bias=bias)
    torch._check(len(inputs) in (1, count) and len(kernel_sizes) == count
                 and len(in_channels) in (0, count),
                 lambda: "pyevo::population_conv2d: list lengths do not match the candidates")
    outputs = []
    for i in range(count):
        x = inputs[0] if len(inputs) == 1 else inputs[i]
        k = kernel_sizes[i]
        torch._check(x.dim() == 4, lambda: "pyevo::population_conv2d: inputs must be 4-D")
        torch._check(k % 2 == 1 and k <= weight.shape[2],
                     lambda: f"pyevo::population_conv2d: bad kernel_size {k}")
        outputs.append(x.new_empty((x.shape[0], out_channels[i],
                                    _conv2d_output_size(x.shape[2], k, stride),
                                    _conv2d_output_size(x.shape[3], k, stride))))
    return outputs


@torch.library.register_fake("pyevo::population_group_norm_silu")
def _population_group_norm_silu_fake(inputs, weight, bias, channels_per_group, eps):
    torch._check(len(inputs) >= 1, lambda: "pyevo::population_group_norm_silu: no inputs")
    _check_like("population_group_norm_silu", "inputs[0]", inputs[0], inputs=inputs, weight=weight, bias=bias)
    for x in inputs:
        torch._check(x.dim() >= 2 and x.shape[1] % channels_per_group == 0,
                     lambda: "pyevo::population_group_norm_silu: input channels are not "
                             "divisible by channels_per_group")
    return [x.new_empty(x.shape) for x in inputs]


@torch.library.register_fake("pyevo::population_attention")
def _population_attention_fake(hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight,
                               v_bias, out_weight, out_bias, heads, head_dim):
    count = len(heads)
    torch._check(count >= 1 and len(hidden_states) in (1, count),
                 lambda: "pyevo::population_attention: hidden_states must hold one tensor or one "
                         "per candidate")
    _check_like("population_attention", "hidden_states[0]", hidden_states[0], hidden_states=hidden_states,
                q_weight=q_weight, q_bias=q_bias, k_weight=k_weight, k_bias=k_bias, v_weight=v_weight,
                v_bias=v_bias, out_weight=out_weight, out_bias=out_bias)
    outputs = []
    for i in range(count):
        x = hidden_states[0] if len(hidden_states) == 1 else hidden_states[i]
        torch._check(x.dim() == 3, lambda: "pyevo::population_attention: hidden_states must be "
                                           "(B, S, C)")
        outputs.append(x.new_empty(x.shape))
    return outputs


# ---------------------------------------------------------------------------------------------
# Autograd: each forward saves only its inputs; its backward op recomputes what it needs
# (shared_group_norm_silu: the group statistics, one extra pass over data the backward reads
# anyway; shared_attention: the projections and the attention output).
# ---------------------------------------------------------------------------------------------


def _only_needed(gradients: Sequence[Tensor], inputs: Sequence[Optional[Tensor]],
                 needs_input_grad: Sequence[bool]) -> list:
    """Replaces the placeholders of absent or unwanted gradients with None."""
    return [g if needed and tensor is not None else None
            for g, tensor, needed in zip(gradients, inputs, needs_input_grad)]


def _shared_conv2d_setup_context(ctx, inputs, output):
    input, weight, bias, out_channels, kernel_size, stride = inputs
    ctx.save_for_backward(input, weight, bias)
    ctx.conv_args = (out_channels, kernel_size, stride)


def _shared_conv2d_backward(ctx, grad_output):
    input, weight, bias = ctx.saved_tensors
    output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                   ctx.needs_input_grad[2] and bias is not None]
    gradients = torch.ops.pyevo.shared_conv2d_backward.default(
        grad_output, input, weight, bias, *ctx.conv_args, output_mask)
    return (*_only_needed(gradients, (input, weight, bias), output_mask), None, None, None)


torch.library.register_autograd("pyevo::shared_conv2d", _shared_conv2d_backward,
                                setup_context=_shared_conv2d_setup_context)


def _fused_conv2d_setup_context(ctx, inputs, output):
    # The kernel choice does not matter here: every implementation has this one backward.
    input, weight, bias, temb, residual, scale, out_channels, kernel_size, _kernel = inputs
    ctx.save_for_backward(input, weight, bias)
    ctx.has_temb, ctx.has_residual = temb is not None, residual is not None
    ctx.temb_shape = tuple(temb.shape) if temb is not None else None
    ctx.fused_args = (scale, out_channels, kernel_size)


def _fused_conv2d_backward(ctx, grad_output):
    """out = (conv + temb + residual) * scale: the conv's gradients are shared_conv2d's at
    grad_output * scale; temb's is its spatial sum (in its first out_channels columns), the
    residual's grad_output * scale."""
    input, weight, bias = ctx.saved_tensors
    scale, out_channels, kernel_size = ctx.fused_args
    grad = grad_output * scale
    output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                   ctx.needs_input_grad[2] and bias is not None]
    grad_input = grad_weight = grad_bias = grad_temb = grad_residual = None
    if any(output_mask):
        gradients = torch.ops.pyevo.shared_conv2d_backward.default(
            grad, input, weight, bias, out_channels, kernel_size, 1, output_mask)
        grad_input, grad_weight, grad_bias = _only_needed(gradients, (input, weight, bias),
                                                          output_mask)
    if ctx.has_temb and ctx.needs_input_grad[3]:
        grad_temb = grad.new_zeros(ctx.temb_shape)
        grad_temb[:, :out_channels] = grad.sum(dim=(2, 3))
    if ctx.has_residual and ctx.needs_input_grad[4]:
        grad_residual = grad
    return grad_input, grad_weight, grad_bias, grad_temb, grad_residual, None, None, None, None


torch.library.register_autograd("pyevo::fused_conv2d", _fused_conv2d_backward,
                                setup_context=_fused_conv2d_setup_context)


def _shared_group_norm_silu_setup_context(ctx, inputs, output):
    input, weight, bias, channels_per_group, eps = inputs
    ctx.save_for_backward(input, weight, bias)
    ctx.norm_args = (channels_per_group, eps)


def _shared_group_norm_silu_backward(ctx, grad_output):
    input, weight, bias = ctx.saved_tensors
    gradients = torch.ops.pyevo.shared_group_norm_silu_backward.default(
        grad_output, input, weight, bias, *ctx.norm_args)
    return (*_only_needed(gradients, (input, weight, bias), ctx.needs_input_grad[:3]), None, None)


torch.library.register_autograd("pyevo::shared_group_norm_silu", _shared_group_norm_silu_backward,
                                setup_context=_shared_group_norm_silu_setup_context)


def _shared_attention_setup_context(ctx, inputs, output):
    # The kernel choice concerns the forward only: the backward is one composite.
    *tensors, heads, head_dim, _kernel = inputs
    ctx.save_for_backward(*tensors)
    ctx.attention_args = (heads, head_dim)


def _shared_attention_backward(ctx, grad_output):
    tensors = ctx.saved_tensors
    gradients = torch.ops.pyevo.shared_attention_backward.default(grad_output, *tensors,
                                                                  *ctx.attention_args)
    return (*_only_needed(gradients, tensors, ctx.needs_input_grad[:10]), None, None, None)


torch.library.register_autograd("pyevo::shared_attention", _shared_attention_backward,
                                setup_context=_shared_attention_setup_context)


# The population ops are forward only: the search evaluates candidates with them and never
# trains through them. Asking for a gradient is an error that says what to do instead.
def _forward_only(name: str):
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"pyevo::{name} is forward only (it evaluates search candidates and has "
                           "no backward); to train a candidate, call the single-candidate op "
                           f"(pyevo::{name.replace('population_', 'shared_')}) for it")

    torch.library.register_autograd(f"pyevo::{name}", backward, setup_context=setup_context)


for _name in ("population_conv2d", "population_group_norm_silu", "population_attention"):
    _forward_only(_name)


# Autocast: cast the floating inputs as ATen's autocast does for the ops' ATen counterparts, then
# run the op with autocast excluded (the casts are ordinary ops, so autograd sees them).
_AUTOCAST_POLICY = {"shared_conv2d": "lower", "fused_conv2d": "lower", "shared_attention": "lower",
                    "population_conv2d": "lower",
                    "population_attention": "lower", "shared_group_norm_silu": "float32",
                    "population_group_norm_silu": "float32"}
_autocast_library = torch.library.Library("pyevo", "IMPL")


def _cast_floating(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() and value.device.type == device_type else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floating(item, device_type, dtype) for item in value)
    return value


def _register_autocast(name: str, policy: str, device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    op = getattr(torch.ops.pyevo, name).default
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(keyset, *args):
        dtype = torch.float32 if policy == "float32" else torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*_cast_floating(args, device_type, dtype))

    _autocast_library.impl(name, kernel, key, with_keyset=True)


for _name, _policy in _AUTOCAST_POLICY.items():
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_name, _policy, _device_type)
