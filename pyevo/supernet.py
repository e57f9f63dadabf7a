"""The weight-shared supernet: one super-block per searchable teacher block.

A super-block is a deep copy of the teacher's diffusers block in which every searched
``ResnetBlock2D`` became a ``SuperResnetBlock2D``, every searched ``Attention`` a
``SuperAttention`` and every searched ``Transformer2DModel`` a ``SuperTransformer2D``. The block's
own forward (samplers, skip tensors, residual tuples, the up-block signature, the text states it
hands its transformers) stays diffusers'; only the searched layers change, and they follow the
genome last given to ``SuperBlock.set_genome``.

Initialised from the teacher so that the teacher-shaped path computes the teacher block:

* conv kernels are stored 5x5 with the teacher's 3x3 in the centre and a zero ring; a k x k choice
  reads the centred crop (1x1 = the centre tap) through ``torch.ops.pyevo.shared_conv2d``;
* hidden channels (conv1 out = norm2 = conv2 in) are re-ordered by whole norm2 groups, most
  important first, so a width prefix keeps the most important groups; norm2 keeps its
  channels-per-group, so a prefix of whole groups normalises exactly as those groups did;
* attention heads are re-ordered by importance the same way, so a head prefix keeps the
  most important heads (in transformers too, per layer, for attn1 and attn2 each);
* a transformer's GEGLU feed-forward units (a row of the value half and the paired row of the gate
  half of its projection, and the matching column of the output projection) are re-ordered by
  importance, so an inner-width prefix keeps the most important units; a layers prefix keeps the
  first layers.

Both re-orderings are permutations applied consistently to every tensor that touches the
permuted channels, so they do not change the full-width function.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

import pyevo  # noqa: F401  (loads pyevo._C, which registers torch.ops.pyevo.*)
from pyevo.space import (MAX_KERNEL_SIZE, AttentionArch, AttentionChoices, BlockSpace, Genome, ResnetArch,
                         ResnetChoices, TransformerArch, TransformerChoices, searchable_blocks, unet_space)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ configs
@dataclass(frozen=True)
class ResnetConfig:
    """The fixed hyper-parameters of a teacher ResnetBlock2D (what a genome does not change)."""

    in_channels: int
    hidden_channels: int  # the teacher's conv1 out channels
    out_channels: int
    temb_channels: int | None
    norm1_groups: int
    norm1_eps: float
    norm2_channels_per_group: int
    norm2_eps: float
    time_embedding_norm: str
    skip_time_act: bool
    output_scale_factor: float
    dropout: float
    has_shortcut: bool
    shortcut_bias: bool

    @classmethod
    def from_resnet(cls, resnet: ResnetBlock2D) -> "ResnetConfig":
        temb = resnet.time_emb_proj
        shortcut = resnet.conv_shortcut
        return cls(in_channels=resnet.conv1.in_channels, hidden_channels=resnet.conv1.out_channels,
                   out_channels=resnet.conv2.out_channels, temb_channels=None if temb is None else temb.in_features,
                   norm1_groups=resnet.norm1.num_groups, norm1_eps=resnet.norm1.eps,
                   norm2_channels_per_group=resnet.norm2.num_channels // resnet.norm2.num_groups,
                   norm2_eps=resnet.norm2.eps, time_embedding_norm=resnet.time_embedding_norm,
                   skip_time_act=resnet.skip_time_act, output_scale_factor=resnet.output_scale_factor,
                   dropout=resnet.dropout.p, has_shortcut=shortcut is not None,
                   shortcut_bias=shortcut is not None and shortcut.bias is not None)


@dataclass(frozen=True)
class AttentionConfig:
    """The fixed hyper-parameters of a teacher self-attention (what a genome does not change)."""

    channels: int
    heads: int
    head_dim: int
    qkv_bias: bool
    out_bias: bool
    norm_groups: int | None
    norm_eps: float
    residual_connection: bool
    rescale_output_factor: float
    upcast_softmax: bool
    dropout: float
    from_deprecated_attn_block: bool

    @classmethod
    def from_attention(cls, attention: Attention) -> "AttentionConfig":
        norm = attention.group_norm
        return cls(channels=attention.query_dim, heads=attention.heads,
                   head_dim=attention.inner_dim // attention.heads, qkv_bias=attention.to_q.bias is not None,
                   out_bias=attention.to_out[0].bias is not None,
                   norm_groups=None if norm is None else norm.num_groups,
                   norm_eps=1e-5 if norm is None else norm.eps,
                   residual_connection=attention.residual_connection,
                   rescale_output_factor=attention.rescale_output_factor,
                   upcast_softmax=attention.upcast_softmax, dropout=attention.to_out[1].p,
                   from_deprecated_attn_block=attention._from_deprecated_attn_block)


@dataclass(frozen=True)
class TransformerConfig:
    """The fixed hyper-parameters of a teacher Transformer2DModel (what a genome does not change)."""

    channels: int
    heads: int  # of attn1 and attn2 alike
    head_dim: int
    layers: int
    cross_attention_dim: int
    norm_groups: int
    use_linear_projection: bool
    attention_bias: bool  # q/k/v projections
    out_bias: bool  # attention output projections
    ff_inner: int
    ff_bias: bool
    upcast_attention: bool
    dropout: float
    norm_eps: float  # the layers' LayerNorms
    norm_elementwise_affine: bool

    @classmethod
    def from_transformer(cls, transformer: Transformer2DModel) -> "TransformerConfig":
        layer = transformer.transformer_blocks[0]
        config = transformer.config
        return cls(channels=transformer.in_channels, heads=layer.attn1.heads,
                   head_dim=layer.attn1.inner_dim // layer.attn1.heads, layers=len(transformer.transformer_blocks),
                   cross_attention_dim=layer.attn2.cross_attention_dim, norm_groups=transformer.norm.num_groups,
                   use_linear_projection=transformer.use_linear_projection,
                   attention_bias=layer.attn1.to_q.bias is not None, out_bias=layer.attn1.to_out[0].bias is not None,
                   ff_inner=layer.ff.net[2].in_features, ff_bias=layer.ff.net[2].bias is not None,
                   upcast_attention=config.upcast_attention, dropout=config.dropout, norm_eps=config.norm_eps,
                   norm_elementwise_affine=config.norm_elementwise_affine)


# ------------------------------------------------------------ shared layers
class SharedConv2d(nn.Module):
    """A conv whose candidates read ``weight[:out, :in]`` and a centred k x k crop of its kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor, out_channels: int, kernel_size: int) -> torch.Tensor:
        return torch.ops.pyevo.shared_conv2d(x, self.weight, self.bias, out_channels, kernel_size, 1)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, out_order: torch.Tensor | None = None,
                  in_order: torch.Tensor | None = None) -> "SharedConv2d":
        """The conv's kernel centred in a MAX_KERNEL_SIZE kernel (zero ring), rows/columns re-ordered."""
        weight = conv.weight.detach()
        if out_order is not None:
            weight = weight[out_order]
        if in_order is not None:
            weight = weight[:, in_order]
        k = conv.kernel_size[0]
        ring = (MAX_KERNEL_SIZE - k) // 2
        shared = weight.new_zeros(weight.shape[0], weight.shape[1], MAX_KERNEL_SIZE, MAX_KERNEL_SIZE)
        shared[:, :, ring:ring + k, ring:ring + k] = weight
        bias = None
        if conv.bias is not None:
            bias = conv.bias.detach()
            bias = (bias[out_order] if out_order is not None else bias).clone()
        return cls(shared, bias)

    def crop(self, out_channels: int, in_channels: int, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense weight (and bias) one candidate computes with (copies, for export)."""
        ring = (MAX_KERNEL_SIZE - kernel_size) // 2
        weight = self.weight[:out_channels, :in_channels, ring:ring + kernel_size, ring:ring + kernel_size]
        bias = None if self.bias is None else self.bias[:out_channels]
        return weight.detach().clone(), None if bias is None else bias.detach().clone()


class SharedGroupNorm(nn.Module):
    """GroupNorm over a channel prefix with a fixed channels-per-group (affine = the prefix)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, channels_per_group: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.channels_per_group = channels_per_group
        self.eps = eps

    def forward_silu(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(GroupNorm(x)), fused."""
        return torch.ops.pyevo.shared_group_norm_silu(x, self.weight, self.bias, self.channels_per_group, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm(x) alone (scale_shift resnets modulate between the norm and the SiLU)."""
        channels = x.shape[1]
        return F.group_norm(x, channels // self.channels_per_group, self.weight[:channels], self.bias[:channels],
                            self.eps)

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, order: torch.Tensor | None = None) -> "SharedGroupNorm":
        weight, bias = norm.weight.detach(), norm.bias.detach()
        if order is not None:
            weight, bias = weight[order], bias[order]
        return cls(weight.clone(), bias.clone(), norm.num_channels // norm.num_groups, norm.eps)


# ---------------------------------------------------------- importance order
def hidden_channel_order(resnet: ResnetBlock2D) -> torch.Tensor:
    """A permutation of the hidden channels that lists whole norm2 groups, most important first.

    A hidden channel c reaches the output only through conv2, after norm2 and SiLU. After the
    group normalisation its pre-activation is gamma_c * z + beta_c with z of zero mean and unit
    variance, so its second moment is gamma_c^2 + beta_c^2 whatever conv1 did (GroupNorm removes
    conv1's scale, which is why conv1's weights are not a good measure). conv2 then reads it with
    the weights W2[:, c]. The channel's contribution is thus scored
    sqrt(gamma_c^2 + beta_c^2) * ||W2[:, c]||_2, and a group by the L2 norm of its channels'
    scores (groups are kept or dropped whole, so they are ranked whole). Ties keep teacher order.
    """
    norm2, conv2 = resnet.norm2, resnet.conv2
    per_group = norm2.num_channels // norm2.num_groups
    with torch.no_grad():
        gain = torch.sqrt(norm2.weight.double() ** 2 + norm2.bias.double() ** 2)
        reads = conv2.weight.double().transpose(0, 1).flatten(1).norm(dim=1)
        channel_score = gain * reads
        group_score = channel_score.view(norm2.num_groups, per_group).norm(dim=1)
        groups = torch.sort(-group_score, stable=True).indices
    return (groups[:, None] * per_group + torch.arange(per_group)).flatten()


def head_order(attention: Attention) -> torch.Tensor:
    """A permutation of the heads, most important first.

    Attention weights are convex combinations, so a head's output is bounded by its value path:
    a head h is scored ||W_v[h rows]||_F * ||W_out[:, h columns]||_F. Ties keep teacher order.
    """
    heads = attention.heads
    with torch.no_grad():
        value = attention.to_v.weight.double().view(heads, -1).norm(dim=1)
        out = attention.to_out[0].weight.double().view(attention.query_dim, heads, -1).transpose(0, 1)
        score = value * out.flatten(1).norm(dim=1)
        return torch.sort(-score, stable=True).indices


def ff_unit_order(ff: FeedForward, norm: nn.LayerNorm) -> torch.Tensor:
    """A permutation of a GEGLU feed-forward's inner units, most important first.

    Unit i computes value_i * gelu(gate_i) from rows i and I + i of the GEGLU projection (I the
    inner width) and is read by column i of the output projection. The feed-forward's input is
    ``norm``'s output, gamma * z + beta with z of zero mean and unit variance over the channels, so
    a row w (bias b) has the pre-activation (w * gamma) . z + (w . beta + b): scored
    sqrt(||w * gamma||^2 + (w . beta + b)^2), whatever came before the norm. A unit is scored by the
    product of its value and gate scores and the norm of its output column. Ties keep teacher order.
    """
    proj, out = ff.net[0].proj, ff.net[2]
    inner = out.in_features
    with torch.no_grad():
        weight = proj.weight.double()
        bias = proj.bias.double() if proj.bias is not None else weight.new_zeros(weight.shape[0])
        if norm.weight is not None:
            gain = norm.weight.double()
            shift = norm.bias.double() if norm.bias is not None else torch.zeros_like(gain)
            bias = bias + weight @ shift
            weight = weight * gain
        row_score = torch.sqrt(weight.pow(2).sum(dim=1) + bias ** 2)
        score = row_score[:inner] * row_score[inner:] * out.weight.double().norm(dim=0)
        return torch.sort(-score, stable=True).indices


def _head_projections(attention: Attention) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.ModuleList]:
    """Copies of an attention's to_q, to_k, to_v (rows) and to_out ([Linear, Dropout]; columns) with
    the heads in ``head_order``: a head prefix of them is the most important heads."""
    head_dim = attention.inner_dim // attention.heads
    rows = (head_order(attention)[:, None] * head_dim + torch.arange(head_dim)).flatten()
    to_out = copy.deepcopy(attention.to_out)
    with torch.no_grad():
        to_out[0].weight.copy_(attention.to_out[0].weight[:, rows])
    return (_linear_rows(attention.to_q, rows), _linear_rows(attention.to_k, rows),
            _linear_rows(attention.to_v, rows), to_out)


# ------------------------------------------------------------ super-layers
class SuperResnetBlock2D(nn.Module):
    """A ResnetBlock2D whose kernels and hidden width (or skip) follow ``arch``."""

    def __init__(self, resnet: ResnetBlock2D, choices: ResnetChoices):
        super().__init__()
        self.config = ResnetConfig.from_resnet(resnet)
        self.choices = choices
        order = hidden_channel_order(resnet)
        self.norm1 = SharedGroupNorm.from_group_norm(resnet.norm1)
        self.conv1 = SharedConv2d.from_conv(resnet.conv1, out_order=order)
        self.time_emb_proj = None
        if resnet.time_emb_proj is not None:
            rows = order
            if self.config.time_embedding_norm == "scale_shift":  # [scale; shift], each over the hidden channels
                rows = torch.cat([order, order + self.config.hidden_channels])
            self.time_emb_proj = _linear_rows(resnet.time_emb_proj, rows)
        self.norm2 = SharedGroupNorm.from_group_norm(resnet.norm2, order)
        self.dropout = copy.deepcopy(resnet.dropout)
        self.conv2 = SharedConv2d.from_conv(resnet.conv2, in_order=order)
        self.conv_shortcut = copy.deepcopy(resnet.conv_shortcut)
        # Samplers of up/down resnets hold no weights (Upsample2D/Downsample2D without conv, FIR, pooling).
        self.upsample = resnet.upsample
        self.downsample = resnet.downsample
        self.arch = ResnetArch(resnet.conv1.kernel_size[0], resnet.conv2.kernel_size[0],
                               self.config.hidden_channels)

    def set_arch(self, arch: ResnetArch) -> None:
        self.arch = arch

    def _time_embedding(self, temb: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the hidden prefix receives from the time embedding, from rows of the shared projection:
        (added term, None) for "default", (scale, shift) for "scale_shift"."""
        if not self.config.skip_time_act:
            temb = F.silu(temb)
        weight, bias = self.time_emb_proj.weight, self.time_emb_proj.bias
        first = F.linear(temb, weight[:hidden], bias[:hidden])[:, :, None, None]
        if self.config.time_embedding_norm == "default":
            return first, None
        full = self.config.hidden_channels
        second = F.linear(temb, weight[full:full + hidden], bias[full:full + hidden])[:, :, None, None]
        return first, second

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample is not None:
            return self.upsample(x.contiguous() if x.shape[0] >= 64 else x)
        if self.downsample is not None:
            return self.downsample(x)
        return x

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        arch, config = self.arch, self.config
        shortcut = self._sample(input_tensor)
        if self.conv_shortcut is not None:
            shortcut = self.conv_shortcut(shortcut)
        if arch.skip:
            return shortcut / config.output_scale_factor

        hidden = self._sample(self.norm1.forward_silu(input_tensor))
        hidden = self.conv1(hidden, arch.hidden, arch.kernel1)
        if self.time_emb_proj is None and temb is not None:
            raise ValueError("this resnet has no time_emb_proj (temb_channels=None) but was given temb")
        if config.time_embedding_norm == "default":
            if temb is not None:
                hidden = hidden + self._time_embedding(temb, arch.hidden)[0]
            hidden = self.norm2.forward_silu(hidden)
        else:
            if temb is None:
                raise ValueError("temb must be given when time_embedding_norm is 'scale_shift'")
            scale, shift = self._time_embedding(temb, arch.hidden)
            hidden = F.silu(self.norm2(hidden) * (1 + scale) + shift)
        hidden = self.dropout(hidden)
        hidden = self.conv2(hidden, config.out_channels, arch.kernel2)
        return (shortcut + hidden) / config.output_scale_factor


class SuperAttention(nn.Module):
    """A diffusers self-attention whose kept heads (a prefix) or drop follow ``arch``."""

    def __init__(self, attention: Attention, choices: AttentionChoices):
        super().__init__()
        self.config = AttentionConfig.from_attention(attention)
        self.choices = choices
        self.group_norm = copy.deepcopy(attention.group_norm)
        self.to_q, self.to_k, self.to_v, self.to_out = _head_projections(attention)
        self.arch = AttentionArch(self.config.heads, self.config.head_dim)

    def set_arch(self, arch: AttentionArch) -> None:
        self.arch = arch

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if self.arch.dropped:
            return hidden_states
        self.check_self_attention(encoder_hidden_states, attention_mask)
        out_linear = self.to_out[0]
        attended = torch.ops.pyevo.shared_attention(
            self.normed_sequence(hidden_states), None, self.to_q.weight, self.to_q.bias, self.to_k.weight,
            self.to_k.bias, self.to_v.weight, self.to_v.bias, out_linear.weight, out_linear.bias, self.arch.heads,
            self.arch.head_dim)
        return self.finish(attended, hidden_states)

    # The steps around the attention op, shared with the search's population forward.
    @staticmethod
    def check_self_attention(encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SuperAttention is self-attention without a mask: got encoder_hidden_states "
                             "or attention_mask")

    def normed_sequence(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` or ``(B, S, C)`` input -> the group-normed ``(B, S, C)`` sequence, contiguous."""
        if hidden_states.ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states.contiguous()

    def finish(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The attention op's ``(B, S, C)`` output back in ``residual``'s layout, residual added, rescaled."""
        hidden_states = self.to_out[1](attended)
        if residual.ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(residual.shape)
        if self.config.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / self.config.rescale_output_factor


class SuperTransformerAttention(nn.Module):
    """A transformer layer's attn1 (self-attention) or attn2 (cross-attention) with its heads in
    importance order; computes a head prefix.

    ``pyevo::shared_attention`` takes keys and values from encoder states of their own width, so
    cross-attention runs through it like self-attention (the K/V projections' row prefixes read the
    text states). While a block's candidates are scored (inside
    :meth:`SuperBlock.sharing_text_projections`, which the search opens around one block's search),
    the text states' keys and values of all heads are projected once per batch and every candidate
    attends to its head prefix of them (:meth:`text_keys_values`): the text states are the same for
    every candidate, only the queries differ. Elsewhere, and always under autograd (in the
    distillation each path's backward frees its graph before the next path runs), every call
    projects its own, so a forward's cost stays the candidate's own cost."""

    def __init__(self, attention: Attention):
        super().__init__()
        self.head_dim = attention.inner_dim // attention.heads
        self.to_q, self.to_k, self.to_v, self.to_out = _head_projections(attention)
        self.share_text_projections = False  # set by SuperBlock.sharing_text_projections
        self._text_keys_values: tuple | None = None  # (cache key, the states, keys, values)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                heads: int) -> torch.Tensor:
        if (self.share_text_projections and encoder_hidden_states is not None and heads > 0
                and not torch.is_grad_enabled() and not encoder_hidden_states.is_inference()):
            keys, values = self.text_keys_values(encoder_hidden_states)
            return self.to_out[1](self._attend(hidden_states, keys, values, heads))
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.contiguous()
        out_linear = self.to_out[0]
        attended = torch.ops.pyevo.shared_attention(
            hidden_states.contiguous(), encoder_hidden_states, self.to_q.weight, self.to_q.bias, self.to_k.weight,
            self.to_k.bias, self.to_v.weight, self.to_v.bias, out_linear.weight, out_linear.bias, heads,
            self.head_dim)
        return self.to_out[1](attended)

    @torch.no_grad()
    def text_keys_values(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All heads' keys and values [B, L, H * head_dim] of ``encoder_hidden_states``, projected on the
        first call for these states and these weights and reused while both stay as they are.

        The key names the states' memory (storage, offset, shape, strides, dtype) and version counter,
        the projections' weights and their versions, and the autocast state: a view of the same states
        (the search slices its held-out calls anew for each candidate) hits, an in-place change of
        states or weights (an optimizer step) misses. The cache holds the states themselves, so their
        memory cannot be freed and reused by other states with the same address. (Inference-mode
        tensors keep no version counter: :meth:`forward` does not cache them.)"""
        states = encoder_hidden_states
        weights = [t for t in (self.to_k.weight, self.to_k.bias, self.to_v.weight, self.to_v.bias) if t is not None]
        autocast = (torch.is_autocast_enabled(states.device.type),
                    torch.get_autocast_dtype(states.device.type) if states.device.type in ("cpu", "cuda") else None)
        key = (states.untyped_storage().data_ptr(), states.storage_offset(), tuple(states.shape), states.stride(),
               states.dtype, states.device, states._version, autocast,
               tuple((id(t), t._version, t.dtype, t.device) for t in weights))
        cached = self._text_keys_values
        if cached is None or cached[0] != key:
            keys = F.linear(states, self.to_k.weight, self.to_k.bias)
            values = F.linear(states, self.to_v.weight, self.to_v.bias)
            self._text_keys_values = cached = (key, states, keys, values)
        return cached[2], cached[3]

    def _attend(self, hidden_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                heads: int) -> torch.Tensor:
        """What ``pyevo::shared_attention`` computes for the first ``heads`` heads, from the keys and
        values of all heads already projected."""
        inner = heads * self.head_dim
        out_linear = self.to_out[0]
        bias = None if self.to_q.bias is None else self.to_q.bias[:inner]
        query = F.linear(hidden_states, self.to_q.weight[:inner], bias)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t[..., :inner].unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(query), split(keys), split(values))
        return F.linear(attended.transpose(1, 2).flatten(2), out_linear.weight[:, :inner], out_linear.bias)


class SuperFeedForward(nn.Module):
    """A GEGLU FeedForward with its inner units in ``ff_unit_order``; computes an inner-width prefix.

    GEGLU's projection holds [value | gate] halves of one Linear: the prefix reads the first rows of
    each half (the paired rows), and the first columns of the output projection."""

    def __init__(self, ff: FeedForward, norm: nn.LayerNorm):
        super().__init__()
        self.inner = ff.net[2].in_features
        order = ff_unit_order(ff, norm)
        self.proj = _linear_rows(ff.net[0].proj, torch.cat([order, order + self.inner]))
        self.dropout = copy.deepcopy(ff.net[1])
        self.out = copy.deepcopy(ff.net[2])
        with torch.no_grad():
            self.out.weight.copy_(ff.net[2].weight[:, order])

    def value_gate_rows(self, inner: int) -> tuple[torch.Tensor, torch.Tensor | None,
                                                   torch.Tensor, torch.Tensor | None]:
        """The value and gate weights (and biases) of the first ``inner`` units: views, not copies."""
        weight, bias, full = self.proj.weight, self.proj.bias, self.inner
        return (weight[:inner], None if bias is None else bias[:inner],
                weight[full:full + inner], None if bias is None else bias[full:full + inner])

    def forward(self, hidden_states: torch.Tensor, inner: int) -> torch.Tensor:
        value_weight, value_bias, gate_weight, gate_bias = self.value_gate_rows(inner)
        hidden = F.linear(hidden_states, value_weight, value_bias) * F.gelu(F.linear(hidden_states, gate_weight,
                                                                                      gate_bias))
        return F.linear(self.dropout(hidden), self.out.weight[:, :inner], self.out.bias)


class SuperTransformerLayer(nn.Module):
    """A BasicTransformerBlock (layer norms; self-attention, cross-attention, GEGLU feed-forward, each
    residual) whose heads and feed-forward width follow the transformer's arch."""

    def __init__(self, layer: BasicTransformerBlock):
        super().__init__()
        self.norm1 = copy.deepcopy(layer.norm1)
        self.attn1 = SuperTransformerAttention(layer.attn1)
        self.norm2 = copy.deepcopy(layer.norm2)
        self.attn2 = SuperTransformerAttention(layer.attn2)
        self.norm3 = copy.deepcopy(layer.norm3)
        self.ff = SuperFeedForward(layer.ff, layer.norm3)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                arch: TransformerArch) -> torch.Tensor:
        hidden_states = self.attn1(self.norm1(hidden_states), None, arch.self_heads) + hidden_states
        hidden_states = self.attn2(self.norm2(hidden_states), encoder_hidden_states, arch.cross_heads) + hidden_states
        return self.ff(self.norm3(hidden_states), arch.ff_inner) + hidden_states


class SuperTransformer2D(nn.Module):
    """A diffusers Transformer2DModel (continuous input) whose layers prefix, heads and feed-forward width,
    or drop, follow ``arch``.

    Called as the cross-attention blocks call a Transformer2DModel and returns what it returns
    (``(sample,)`` with ``return_dict=False``), so the block's own forward stays diffusers'. Dropped,
    it returns its input unchanged."""

    def __init__(self, transformer: Transformer2DModel, choices: TransformerChoices):
        super().__init__()
        self.config = TransformerConfig.from_transformer(transformer)
        self.choices = choices
        self.norm = copy.deepcopy(transformer.norm)
        self.proj_in = copy.deepcopy(transformer.proj_in)
        self.transformer_blocks = nn.ModuleList(SuperTransformerLayer(layer)
                                                for layer in transformer.transformer_blocks)
        self.proj_out = copy.deepcopy(transformer.proj_out)
        config = self.config
        self.arch = TransformerArch(config.layers, config.heads, config.heads, config.head_dim, config.ff_inner)

    def set_arch(self, arch: TransformerArch) -> None:
        self.arch = arch

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, added_cond_kwargs: dict | None = None,
                class_labels: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None,
                attention_mask: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                return_dict: bool = True):
        # timestep, class_labels and added_cond_kwargs condition only ada-norm transformers, which the
        # space refuses; a layer-norm Transformer2DModel ignores them too.
        if not self.arch.dropped:
            if attention_mask is not None or encoder_attention_mask is not None:
                raise ValueError("SuperTransformer2D takes no attention_mask / encoder_attention_mask "
                                 "(pyevo::shared_attention has no mask)")
            if cross_attention_kwargs:
                raise ValueError("SuperTransformer2D takes no cross_attention_kwargs, got "
                                 f"{sorted(cross_attention_kwargs)}")
            hidden_states = self._transform(hidden_states, encoder_hidden_states)
        return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)

    def _transform(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        """Transformer2DModel's continuous-input path (norm, proj_in, layers, proj_out, residual)."""
        batch, channels, height, width = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if not self.config.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        inner = hidden_states.shape[1]
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, inner)
        if self.config.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        for layer in self.transformer_blocks[:self.arch.layers]:
            hidden_states = layer(hidden_states, encoder_hidden_states, self.arch)
        if self.config.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch, height, width, hidden_states.shape[-1]).permute(0, 3, 1, 2)
        if not self.config.use_linear_projection:
            hidden_states = self.proj_out(hidden_states.contiguous())
        return hidden_states.contiguous() + residual


def _linear_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    copied = copy.deepcopy(linear)
    with torch.no_grad():
        copied.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            copied.bias.copy_(linear.bias[rows])
    return copied


# -------------------------------------------------------------- super-block
class SuperBlock(nn.Module):
    """One teacher block with its searched layers weight-shared; computes the genome last set.

    Called exactly like the teacher block (same arguments, same returns). Attributes the UNet's
    forward inspects on a block (``resnets``, ``skip_conv``, ...) are read through to the block,
    so a super-block can stand in a UNet for the teacher's.
    """

    def __init__(self, teacher_block: nn.Module, space: BlockSpace):
        super().__init__()
        self.space = space
        self.block = copy.deepcopy(teacher_block)
        for choices in space.resnets:
            self.block.resnets[choices.index] = SuperResnetBlock2D(self.block.resnets[choices.index], choices)
        for choices in space.attentions:
            self.block.attentions[choices.index] = SuperAttention(self.block.attentions[choices.index], choices)
        for choices in space.transformers:
            self.block.attentions[choices.index] = SuperTransformer2D(self.block.attentions[choices.index], choices)
        self.requires_grad_(True)  # the teacher may be frozen; the super-block is what gets trained
        self.genome: Genome = space.teacher_genome()
        self.set_genome(self.genome)

    def set_genome(self, genome: Genome) -> None:
        arch = self.space.arch(genome)
        for index, resnet_arch in arch.resnets.items():
            self.block.resnets[index].set_arch(resnet_arch)
        for index, attention_arch in arch.attentions.items():
            self.block.attentions[index].set_arch(attention_arch)
        for index, transformer_arch in arch.transformers.items():
            self.block.attentions[index].set_arch(transformer_arch)
        self.genome = self.space.canonical(genome)

    def super_resnets(self) -> Iterator[SuperResnetBlock2D]:
        return (self.block.resnets[c.index] for c in self.space.resnets)

    def super_attentions(self) -> Iterator[SuperAttention]:
        return (self.block.attentions[c.index] for c in self.space.attentions)

    def super_transformers(self) -> Iterator[SuperTransformer2D]:
        return (self.block.attentions[c.index] for c in self.space.transformers)

    @contextlib.contextmanager
    def sharing_text_projections(self) -> Iterator[None]:
        """Inside: the cross-attentions project each batch's text states once, for all the genomes
        scored without autograd (:class:`SuperTransformerAttention`); on exit the projections are freed."""
        attentions = [m for m in self.modules() if isinstance(m, SuperTransformerAttention)]
        for attention in attentions:
            attention.share_text_projections = True
        try:
            yield
        finally:
            for attention in attentions:
                attention.share_text_projections = False
                attention._text_keys_values = None

    def forward(self, *args, **kwargs):
        return self.block(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "block":
                raise
            return getattr(super().__getattr__("block"), name)


# ---------------------------------------------------------------- supernet
def _module_key(block_name: str) -> str:
    """ModuleDict keys cannot hold '.': "down_blocks.1" -> "down_blocks_1"."""
    return block_name.replace(".", "_")


class Supernet(nn.Module):
    """The super-blocks of a UNet, looked up by block name (``supernet["down_blocks.1"]``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        teacher_blocks = searchable_blocks(unet)
        self.spaces = {space.name: space for space in unet_space(unet)}
        self.names = list(self.spaces)
        self.blocks = nn.ModuleDict({_module_key(name): SuperBlock(teacher_blocks[name], space)
                                     for name, space in self.spaces.items()})
        log.info("supernet: %d blocks, %.2f M shared parameters", len(self.names),
                 sum(p.numel() for p in self.parameters()) / 1e6)

    def __getitem__(self, name: str) -> SuperBlock:
        if name not in self.spaces:
            raise KeyError(f"no super-block {name!r} (blocks: {', '.join(self.names)})")
        return self.blocks[_module_key(name)]

    def __contains__(self, name: object) -> bool:
        return name in self.spaces

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def keys(self) -> list[str]:
        return list(self.names)

    def values(self) -> list[SuperBlock]:
        return [self[name] for name in self.names]

    def items(self) -> list[tuple[str, SuperBlock]]:
        return [(name, self[name]) for name in self.names]

    def set_genome(self, network: Mapping[str, Genome]) -> None:
        """Set every named block's genome (blocks not named keep theirs)."""
        for name, genome in network.items():
            self[name].set_genome(genome)

    def network_genome(self) -> dict[str, Genome]:
        """The genome each super-block holds now."""
        return {name: self[name].genome for name in self.names}


def build_supernet(unet: nn.Module) -> Supernet:
    """The supernet of a diffusers UNet, initialised so each teacher-shaped path is the teacher."""
    return Supernet(unet)


def supernet_unet(unet: nn.Module, supernet: Supernet) -> nn.Module:
    """A copy of the UNet whose searchable blocks are the supernet's (shared, not copied).

    Its forward computes the whole network for the genomes the super-blocks hold; the stem and head
    are copies of the teacher's.
    """
    assembled = copy.deepcopy(unet)
    assembled.down_blocks = nn.ModuleList([supernet[f"down_blocks.{i}"] for i in range(len(unet.down_blocks))])
    assembled.up_blocks = nn.ModuleList([supernet[f"up_blocks.{i}"] for i in range(len(unet.up_blocks))])
    if getattr(unet, "mid_block", None) is not None:
        assembled.mid_block = supernet["mid_block"]
    return assembled
