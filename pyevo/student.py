"""The exported student: a diffusers UNet whose searched layers take the genome's shapes.

``StudentUNet2DModel`` is ``UNet2DModel`` (``StudentUNet2DConditionModel`` is ``UNet2DConditionModel``,
a drop-in ``unet`` for ``StableDiffusionPipeline``) with one more config field, ``genome`` (the network genome
string, see ``pyevo.space``). Its constructor builds the teacher-shaped network from the config and
then swaps every searched layer for a plain static one: ``SlimResnetBlock2D`` (nn.Conv2d, GroupNorm,
Linear, SiLU), ``ShortcutOnly`` for a skipped resnet, a diffusers ``Attention`` with fewer heads,
or ``DroppedAttention``. (The transformers of conditional UNets likewise become a diffusers
``Transformer2DModel`` of fewer layers whose attentions have fewer heads and whose feed-forwards a
smaller inner width, or ``DroppedTransformer2D``: see ``static_transformer``.) So
``save_pretrained`` / ``from_pretrained`` round-trip through the config alone, and the model is a
drop-in ``unet`` for ``DDPMPipeline`` / ``DDIMPipeline``. Inference uses no supernet op.

``build_static_block`` turns one super-block and a genome into such a stand-alone block (for
per-block latency and cost); ``StudentUNet2DModel.from_supernet`` assembles the whole student
from the teacher's stem/head and the supernet's blocks; ``load_student(folder)`` reloads either kind.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
from pathlib import Path
from typing import Callable, Mapping

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from pyevo.space import (AttentionArch, BlockSpace, NetworkGenome, ResnetArch, TransformerArch, decode_network,
                         encode_network, teacher_network, unet_space)
from pyevo.supernet import (AttentionConfig, ResnetConfig, SuperAttention, SuperBlock, SuperFeedForward,
                            SuperResnetBlock2D, Supernet, SuperTransformer2D, TransformerConfig)

log = logging.getLogger(__name__)

SEARCHED_CHILDREN = ("down_blocks", "mid_block", "up_blocks")


# ------------------------------------------------------------ static layers
def _shortcut_conv(config: ResnetConfig) -> nn.Conv2d | None:
    """The teacher resnet's 1x1 shortcut conv, shaped (weights loaded later), or None for identity."""
    if not config.has_shortcut:
        return None
    return nn.Conv2d(config.in_channels, config.out_channels, 1, bias=config.shortcut_bias)


class SlimResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D computation with its own kernels and hidden width.

    Submodule names follow ResnetBlock2D (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut).
    """

    def __init__(self, config: ResnetConfig, arch: ResnetArch, upsample: Callable | None = None,
                 downsample: Callable | None = None):
        super().__init__()
        hidden = arch.hidden
        self.time_embedding_norm = config.time_embedding_norm
        self.skip_time_act = config.skip_time_act
        self.output_scale_factor = config.output_scale_factor
        self.norm1 = nn.GroupNorm(config.norm1_groups, config.in_channels, eps=config.norm1_eps)
        self.conv1 = nn.Conv2d(config.in_channels, hidden, arch.kernel1, padding=arch.kernel1 // 2)
        self.time_emb_proj = None
        if config.temb_channels is not None:
            rows = 2 * hidden if config.time_embedding_norm == "scale_shift" else hidden
            self.time_emb_proj = nn.Linear(config.temb_channels, rows)
        self.norm2 = nn.GroupNorm(hidden // config.norm2_channels_per_group, hidden, eps=config.norm2_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = nn.Conv2d(hidden, config.out_channels, arch.kernel2, padding=arch.kernel2 // 2)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = _shortcut_conv(config)
        self.upsample = upsample
        self.downsample = downsample

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        return resnet_forward(self, input_tensor, temb)


def _norm_then_silu(resnet: nn.Module, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return resnet.nonlinearity(norm(x))


def resnet_forward(resnet: nn.Module, input_tensor: torch.Tensor, temb: torch.Tensor | None = None,
                   norm_silu: Callable = _norm_then_silu, conv_epilogue: Callable | None = None) -> torch.Tensor:
    """diffusers' ResnetBlock2D computation on ``resnet``'s layers (a ``ResnetBlock2D`` or a
    ``SlimResnetBlock2D``: the same submodule names). ``norm_silu(resnet, norm, x)`` computes
    SiLU(norm(x)) where the two follow each other (after norm1; after norm2 without scale/shift):
    by default the two modules in turn, fused in the lean runtime (``pyevo.runtime``).
    ``conv_epilogue(conv, x, temb, residual, scale)``, where given, computes ``(conv(x) + temb + residual)
    * scale`` (temb ``(N, C)`` or None, residual or None) in one call: conv1 with the time embedding
    added, conv2 with the shortcut added and the output scale (the lean runtime's
    ``pyevo::fused_conv2d``). It is used only where dropout is inactive (it sits before conv2)."""
    if conv_epilogue is not None and resnet.dropout.training and resnet.dropout.p > 0:
        conv_epilogue = None
    hidden = norm_silu(resnet, resnet.norm1, input_tensor)
    if resnet.upsample is not None:
        if hidden.shape[0] >= 64:  # diffusers' guard against upsample_nearest_nhwc failing at large batch
            input_tensor, hidden = input_tensor.contiguous(), hidden.contiguous()
        input_tensor, hidden = resnet.upsample(input_tensor), resnet.upsample(hidden)
    elif resnet.downsample is not None:
        input_tensor, hidden = resnet.downsample(input_tensor), resnet.downsample(hidden)
    if resnet.time_emb_proj is not None and temb is not None:
        if not resnet.skip_time_act:
            temb = resnet.nonlinearity(temb)
        temb = resnet.time_emb_proj(temb)[:, :, None, None]
    # The time embedding goes into conv1's epilogue only as a projected (N, C) row per image.
    fuse_temb = (conv_epilogue is not None and resnet.time_embedding_norm == "default"
                 and (temb is None or resnet.time_emb_proj is not None))
    if fuse_temb:
        hidden = conv_epilogue(resnet.conv1, hidden, None if temb is None else temb[:, :, 0, 0], None, 1.0)
    else:
        hidden = resnet.conv1(hidden)
    if resnet.time_embedding_norm == "default":
        if temb is not None and not fuse_temb:
            hidden = hidden + temb
        hidden = norm_silu(resnet, resnet.norm2, hidden)
    else:
        if temb is None:
            raise ValueError("temb must be given when time_embedding_norm is 'scale_shift'")
        scale, shift = torch.chunk(temb, 2, dim=1)
        hidden = resnet.nonlinearity(resnet.norm2(hidden) * (1 + scale) + shift)
    if resnet.conv_shortcut is not None:
        input_tensor = resnet.conv_shortcut(input_tensor)
    if conv_epilogue is not None:
        return conv_epilogue(resnet.conv2, hidden, None, input_tensor, 1.0 / resnet.output_scale_factor)
    hidden = resnet.conv2(resnet.dropout(hidden))
    return (input_tensor + hidden) / resnet.output_scale_factor


class ShortcutOnly(nn.Module):
    """A skipped resnet: only its shortcut (identity or the teacher's 1x1 conv), rescaled."""

    def __init__(self, config: ResnetConfig, upsample: Callable | None = None, downsample: Callable | None = None):
        super().__init__()
        self.output_scale_factor = config.output_scale_factor
        self.conv_shortcut = _shortcut_conv(config)
        self.upsample = upsample
        self.downsample = downsample

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if self.upsample is not None:
            input_tensor = self.upsample(input_tensor)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor / self.output_scale_factor


class DroppedAttention(nn.Module):
    """A dropped attention: the identity, accepting whatever the block passes an attention."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class DroppedTransformer2D(nn.Module):
    """A dropped Transformer2DModel: the identity, returned as a Transformer2DModel returns its output
    (``(hidden_states,)`` with ``return_dict=False``, which the cross-attention blocks index)."""

    def forward(self, hidden_states: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


def static_resnet(config: ResnetConfig, arch: ResnetArch, upsample: Callable | None = None,
                  downsample: Callable | None = None) -> nn.Module:
    """An initialised-at-random static resnet of the given shape."""
    if arch.skip:
        return ShortcutOnly(config, upsample, downsample)
    return SlimResnetBlock2D(config, arch, upsample, downsample)


def static_attention(config: AttentionConfig, arch: AttentionArch) -> nn.Module:
    """An initialised-at-random diffusers Attention with ``arch.heads`` heads, or DroppedAttention."""
    if arch.dropped:
        return DroppedAttention()
    return Attention(config.channels, heads=arch.heads, dim_head=config.head_dim, dropout=config.dropout,
                     bias=config.qkv_bias, out_bias=config.out_bias, upcast_softmax=config.upcast_softmax,
                     norm_num_groups=config.norm_groups, eps=config.norm_eps,
                     rescale_output_factor=config.rescale_output_factor,
                     residual_connection=config.residual_connection,
                     _from_deprecated_attn_block=config.from_deprecated_attn_block)


def static_transformer(config: TransformerConfig, arch: TransformerArch) -> nn.Module:
    """An initialised-at-random diffusers Transformer2DModel of ``arch.layers`` layers, or
    DroppedTransformer2D.

    The Transformer2DModel is built with the teacher's config but ``num_layers=arch.layers``; in
    every layer, attn1 / attn2 are then diffusers Attentions of ``arch.self_heads`` /
    ``arch.cross_heads`` heads of the teacher's size (projecting to and from the teacher's inner
    width, which proj_in/proj_out keep), and ff a diffusers GEGLU FeedForward of ``arch.ff_inner``
    units: Transformer2DModel's own arguments cannot give its attentions and feed-forward their own
    widths. (Its config's ``num_attention_heads`` thus stays the teacher's.)"""
    if arch.dropped:
        return DroppedTransformer2D()
    transformer = Transformer2DModel(
        num_attention_heads=config.heads, attention_head_dim=config.head_dim, in_channels=config.channels,
        num_layers=arch.layers, dropout=config.dropout, norm_num_groups=config.norm_groups,
        cross_attention_dim=config.cross_attention_dim, attention_bias=config.attention_bias,
        use_linear_projection=config.use_linear_projection, upcast_attention=config.upcast_attention,
        norm_elementwise_affine=config.norm_elementwise_affine, norm_eps=config.norm_eps)
    inner = config.heads * config.head_dim
    for layer in transformer.transformer_blocks:
        for name, heads, cross_attention_dim in (("attn1", arch.self_heads, None),
                                                 ("attn2", arch.cross_heads, config.cross_attention_dim)):
            setattr(layer, name, Attention(inner, cross_attention_dim=cross_attention_dim, heads=heads,
                                           dim_head=config.head_dim, dropout=config.dropout,
                                           bias=config.attention_bias, upcast_attention=config.upcast_attention,
                                           out_bias=config.out_bias))
        layer.ff = FeedForward(inner, dropout=config.dropout, activation_fn="geglu", inner_dim=arch.ff_inner,
                               bias=config.ff_bias)
    return transformer


# -------------------------------------------------- export from the supernet
def export_resnet(super_resnet: SuperResnetBlock2D, arch: ResnetArch) -> nn.Module:
    """The static resnet computing what ``super_resnet`` computes for ``arch`` (weights copied)."""
    config = super_resnet.config
    static = static_resnet(config, arch, copy.deepcopy(super_resnet.upsample), copy.deepcopy(super_resnet.downsample))
    reference = super_resnet.conv1.weight
    static.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        if super_resnet.conv_shortcut is not None:
            static.conv_shortcut.load_state_dict(super_resnet.conv_shortcut.state_dict())
        if arch.skip:
            return static
        hidden = arch.hidden
        static.norm1.weight.copy_(super_resnet.norm1.weight)
        static.norm1.bias.copy_(super_resnet.norm1.bias)
        _copy_conv(static.conv1, *super_resnet.conv1.crop(hidden, config.in_channels, arch.kernel1))
        if static.time_emb_proj is not None:
            rows = torch.arange(hidden, device=reference.device)
            if config.time_embedding_norm == "scale_shift":
                rows = torch.cat([rows, rows + config.hidden_channels])
            static.time_emb_proj.weight.copy_(super_resnet.time_emb_proj.weight[rows])
            static.time_emb_proj.bias.copy_(super_resnet.time_emb_proj.bias[rows])
        static.norm2.weight.copy_(super_resnet.norm2.weight[:hidden])
        static.norm2.bias.copy_(super_resnet.norm2.bias[:hidden])
        _copy_conv(static.conv2, *super_resnet.conv2.crop(config.out_channels, hidden, arch.kernel2))
    return static


def _copy_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    conv.weight.copy_(weight)
    if bias is not None:
        conv.bias.copy_(bias)


def export_attention(super_attention: SuperAttention, arch: AttentionArch) -> nn.Module:
    """The static attention computing what ``super_attention`` computes for ``arch`` (weights copied)."""
    static = static_attention(super_attention.config, arch)
    if arch.dropped:
        return static
    reference = super_attention.to_q.weight
    static.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        if super_attention.group_norm is not None:
            static.group_norm.load_state_dict(super_attention.group_norm.state_dict())
        _copy_head_prefix(super_attention, static, arch.heads * arch.head_dim)
    return static


def _copy_head_prefix(source: nn.Module, target: Attention, inner: int) -> None:
    """The first ``inner`` rows of the source's to_q/to_k/to_v and columns of its to_out into ``target``."""
    for name in ("to_q", "to_k", "to_v"):
        source_linear, target_linear = getattr(source, name), getattr(target, name)
        target_linear.weight.copy_(source_linear.weight[:inner])
        if source_linear.bias is not None:
            target_linear.bias.copy_(source_linear.bias[:inner])
    target.to_out[0].weight.copy_(source.to_out[0].weight[:, :inner])
    if source.to_out[0].bias is not None:
        target.to_out[0].bias.copy_(source.to_out[0].bias)


def _copy_ff_prefix(source: SuperFeedForward, target: FeedForward, inner: int) -> None:
    """The first ``inner`` units of a super feed-forward into a GEGLU FeedForward of that inner width:
    its projection's value rows then the paired gate rows, and the output projection's columns."""
    value_weight, value_bias, gate_weight, gate_bias = source.value_gate_rows(inner)
    target.net[0].proj.weight.copy_(torch.cat([value_weight, gate_weight]))
    if value_bias is not None:
        target.net[0].proj.bias.copy_(torch.cat([value_bias, gate_bias]))
    target.net[2].weight.copy_(source.out.weight[:, :inner])
    if source.out.bias is not None:
        target.net[2].bias.copy_(source.out.bias)


def export_transformer(super_transformer: SuperTransformer2D, arch: TransformerArch) -> nn.Module:
    """The static transformer computing what ``super_transformer`` computes for ``arch`` (weights copied)."""
    static = static_transformer(super_transformer.config, arch)
    if arch.dropped:
        return static
    reference = super_transformer.proj_in.weight
    # nn.Module.to: ModelMixin.to warns on every dtype cast once its (here empty) keep-in-float32 list exists.
    nn.Module.to(static, device=reference.device, dtype=reference.dtype)
    head_dim = super_transformer.config.head_dim
    with torch.no_grad():
        for name in ("norm", "proj_in", "proj_out"):
            getattr(static, name).load_state_dict(getattr(super_transformer, name).state_dict())
        for source, target in zip(super_transformer.transformer_blocks[:arch.layers], static.transformer_blocks,
                                  strict=True):
            for name in ("norm1", "norm2", "norm3"):
                getattr(target, name).load_state_dict(getattr(source, name).state_dict())
            _copy_head_prefix(source.attn1, target.attn1, arch.self_heads * head_dim)
            _copy_head_prefix(source.attn2, target.attn2, arch.cross_heads * head_dim)
            _copy_ff_prefix(source.ff, target.ff, arch.ff_inner)
    return static


def build_static_block(super_block: SuperBlock, genome) -> nn.Module:
    """A stand-alone static copy of one block for ``genome``: same call signature and returns as the
    teacher block, plain layers, weights taken from the super-block (samplers etc. copied)."""
    arch = super_block.space.arch(genome)
    replacements: dict[int, nn.Module] = {}
    for index, resnet_arch in arch.resnets.items():
        super_resnet = super_block.block.resnets[index]
        replacements[id(super_resnet)] = export_resnet(super_resnet, resnet_arch)
    for index, attention_arch in arch.attentions.items():
        super_attention = super_block.block.attentions[index]
        replacements[id(super_attention)] = export_attention(super_attention, attention_arch)
    for index, transformer_arch in arch.transformers.items():
        super_transformer = super_block.block.attentions[index]
        replacements[id(super_transformer)] = export_transformer(super_transformer, transformer_arch)
    # deepcopy consults its memo before copying: seeding it with id(super-layer) -> static layer
    # copies everything else in the block and puts the static layers where the super-layers were.
    return copy.deepcopy(super_block.block, memo=dict(replacements))


def make_block_static(block: nn.Module, space: BlockSpace, genome) -> None:
    """Swap, in place, a teacher-shaped block's searched layers for static ones of ``genome``'s shapes
    (initialised at random: the caller loads weights)."""
    arch = space.arch(genome)
    for index, resnet_arch in arch.resnets.items():
        teacher = block.resnets[index]
        block.resnets[index] = static_resnet(ResnetConfig.from_resnet(teacher), resnet_arch,
                                             teacher.upsample, teacher.downsample)
    for index, attention_arch in arch.attentions.items():
        block.attentions[index] = static_attention(AttentionConfig.from_attention(block.attentions[index]),
                                                   attention_arch)
    for index, transformer_arch in arch.transformers.items():
        block.attentions[index] = static_transformer(TransformerConfig.from_transformer(block.attentions[index]),
                                                     transformer_arch)


# --------------------------------------------------------------- the models
def _with_genome_parameter(teacher_class: type):
    """Give an __init__ ``teacher_class``'s signature plus ``genome``: diffusers' config machinery reads
    the config fields from the __init__ signature (register_to_config, from_config)."""
    def decorate(init):
        parent = inspect.signature(teacher_class.__init__)
        genome = inspect.Parameter("genome", inspect.Parameter.KEYWORD_ONLY, default="", annotation=str)
        init.__signature__ = parent.replace(parameters=[*parent.parameters.values(), genome])
        return init

    return decorate


def _student_init(teacher_class: type):
    """The __init__ of a student of ``teacher_class``: the teacher-shaped network from the config, then
    every searched layer swapped for a static one of the genome's shapes."""
    @register_to_config
    @_with_genome_parameter(teacher_class)
    def __init__(self, *, genome: str = "", **unet_config):
        teacher_class.__init__(self, **unet_config)
        spaces = unet_space(self)
        network = decode_network(genome, spaces) if genome else teacher_network(spaces)
        for space in spaces:
            make_block_static(self.get_submodule(space.name), space, network[space.name])

    return __init__


class _Student:
    """What the student classes share: the teacher's config + ``genome``, the searched layers re-shaped.

    ``genome`` is an ``encode_network`` string over the teacher-shaped network's blocks; the empty
    string means the teacher's genome everywhere (the teacher's architecture). ``teacher_class`` is the
    diffusers UNet class the student is a drop-in for.
    """

    teacher_class: type

    def network_genome(self) -> NetworkGenome:
        """The genome of every block, decoded from the config."""
        spaces = unet_space(_teacher_shaped(self.teacher_class, self.config))
        return decode_network(self.config.genome, spaces) if self.config.genome else teacher_network(spaces)

    @classmethod
    def from_supernet(cls, teacher: nn.Module, supernet: Supernet,
                      network_genome: Mapping[str, tuple[int, ...]] | str):
        """The student of ``network_genome`` with inherited weights: the stem and head (conv_in, time
        and class embeddings, conv_norm_out, conv_out) from ``teacher``, every searched block from
        ``supernet`` (crops and prefixes of the shared weights), so each block computes what its
        super-block computes for that genome. Returned in eval mode on the teacher's device/dtype."""
        spaces = [supernet.spaces[name] for name in supernet.names]
        if isinstance(network_genome, str):
            genomes = decode_network(network_genome, spaces)
        else:
            genomes = {name: tuple(genome) for name, genome in network_genome.items()}
        text = encode_network(genomes, spaces)
        student = cls.from_config(teacher.config, genome=text).to(teacher.device)
        if student.dtype != teacher.dtype:
            student.to(teacher.dtype)
        for name, child in student.named_children():
            if name not in SEARCHED_CHILDREN:
                child.load_state_dict(teacher.get_submodule(name).state_dict())
        for space in spaces:
            static = build_static_block(supernet[space.name], genomes[space.name])
            student.get_submodule(space.name).load_state_dict(static.state_dict())
        log.info("student %s: %.2f M parameters", text, sum(p.numel() for p in student.parameters()) / 1e6)
        return student.eval()


class StudentUNet2DModel(_Student, UNet2DModel):
    """UNet2DModel + ``genome``: a drop-in ``unet`` for DDPMPipeline / DDIMPipeline / LDMPipeline."""

    teacher_class = UNet2DModel
    __init__ = _student_init(UNet2DModel)


class StudentUNet2DConditionModel(_Student, UNet2DConditionModel):
    """UNet2DConditionModel + ``genome``: a drop-in ``unet`` for StableDiffusionPipeline."""

    teacher_class = UNet2DConditionModel
    __init__ = _student_init(UNet2DConditionModel)


STUDENT_CLASSES = {cls.__name__: cls for cls in (StudentUNet2DModel, StudentUNet2DConditionModel)}


def student_class(teacher: nn.Module) -> type:
    """The student class for ``teacher``'s kind of UNet."""
    for cls in STUDENT_CLASSES.values():
        if isinstance(teacher, cls.teacher_class):
            return cls
    raise TypeError(f"no student class for a {type(teacher).__name__}")


def load_student(folder: str | Path, **kwargs) -> nn.Module:
    """The student saved in ``folder`` (``save_pretrained``), as the class its config names
    (StudentUNet2DModel or StudentUNet2DConditionModel); ``kwargs`` go to ``from_pretrained``."""
    folder = Path(folder).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} holds no saved student (no config.json)")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name not in STUDENT_CLASSES:
        raise ValueError(f"{folder} holds a {class_name}, not a pyevo student ({', '.join(STUDENT_CLASSES)})")
    return STUDENT_CLASSES[class_name].from_pretrained(folder, **kwargs)


def _teacher_shaped(teacher_class: type, config: Mapping) -> nn.Module:
    """The teacher-shaped network of a student config, on the meta device (shapes only)."""
    unet_config = {k: v for k, v in config.items() if not k.startswith("_") and k != "genome"}
    with torch.device("meta"):
        return teacher_class(**unet_config)
