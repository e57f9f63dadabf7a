"""The search space: per-block genomes over the teacher's ResnetBlock2D, Attention and Transformer2DModel layers.

A block genome is a tuple of integer choice indices, one per gene, each gene with a fixed number of
choices (so mutation and crossover are plain integer operations). Genes, in this order:

* per ``resnets[i]`` (``ResnetBlock2D``): ``r{i}.k1`` and ``r{i}.k2`` — conv1 / conv2 kernel in
  (1, 3, 5); ``r{i}.width`` — 0 = *skip* (the residual branch removed, the shortcut kept), then the
  hidden widths (conv1 out channels) for ratios 0.5, 0.75, 1.0 of the teacher's, rounded to whole
  GroupNorm groups of the teacher's norm2 (at least one group; ratios that round to the same
  width are merged, so every choice is a distinct architecture);
* per ``attentions[j]`` that is not ``None`` (diffusers ``Attention``): ``a{j}.heads`` —
  0 = *drop* (identity), then the kept head counts (half the teacher's heads, rounded up, and all
  of them; only "all" where the teacher has one head);
* per ``attentions[j]`` that is a ``Transformer2DModel`` (the blocks of a ``UNet2DConditionModel``:
  continuous input, ``BasicTransformerBlock`` layers of self-attention ``attn1``, cross-attention
  ``attn2`` and a GEGLU feed-forward ``ff``), five genes: ``t{j}.keep`` — 0 = *drop* (the whole
  transformer becomes the identity), 1 = keep; ``t{j}.self_heads`` and ``t{j}.cross_heads`` — the
  heads kept in every layer's attn1 / attn2 (half the teacher's, rounded up, and all; only "all"
  where the teacher has one head); ``t{j}.ff`` — the GEGLU inner width for ratios 0.5, 0.75, 1.0
  of the teacher's; ``t{j}.layers`` — how many of the teacher's layers are kept (a prefix, 1..L;
  one choice where the teacher has one layer). Single-choice genes stay in the genome so that
  every transformer has the same five genes and every string the same fields.

When ``r{i}.width`` is skip, the kernel genes of that resnet do not matter, nor the shape genes of
a dropped transformer; the *canonical* genome sets them to the teacher's, so each architecture has
one genome and one string.

String form (stable, human-readable): ``"r0:k3k3w1.0,r1:skip,a0:h4"``, with transformers
``"t0:h8x4f0.75l1"`` (8 self-attention heads, 4 cross-attention heads, feed-forward ratio 0.75,
1 layer) or ``"t0:drop"``; a network genome (one per block) is
``"down_blocks.0=r0:k3k3w1.0,r1:k1k3w0.5;mid_block=...;up_blocks.0=..."``.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, Mapping, Sequence

from diffusers.models.activations import GEGLU
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

KERNEL_SIZES = (1, 3, 5)
WIDTH_RATIOS = (0.5, 0.75, 1.0)
HEAD_RATIOS = (0.5, 1.0)
FF_RATIOS = (0.5, 0.75, 1.0)
TRANSFORMER_GENES = 5  # keep, self_heads, cross_heads, ff, layers
MAX_KERNEL_SIZE = max(KERNEL_SIZES)

Genome = tuple[int, ...]
NetworkGenome = dict[str, Genome]


class UnsupportedBlockError(ValueError):
    """A teacher block holds layers pyevo cannot search (names the block and the layer type)."""


@dataclass(frozen=True)
class Gene:
    """One integer gene: ``num_choices`` choices, labelled for logs and reports."""

    name: str
    labels: tuple[str, ...]

    @property
    def num_choices(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ResnetChoices:
    """What one ``resnets[index]`` may become."""

    index: int
    in_channels: int
    out_channels: int  # conv2 out channels (the block's output width)
    teacher_hidden: int  # conv1 out channels in the teacher
    channels_per_group: int  # norm2 channels per group, kept fixed when the width shrinks
    widths: tuple[int, ...]  # hidden widths, ascending; the last is the teacher's
    width_labels: tuple[str, ...]  # the ratio each width stands for ("0.5", "0.75", "1.0")
    teacher_kernel1: int
    teacher_kernel2: int


@dataclass(frozen=True)
class AttentionChoices:
    """What one ``attentions[index]`` may become."""

    index: int
    channels: int
    head_dim: int
    heads: tuple[int, ...]  # kept head counts, ascending; the last is the teacher's


@dataclass(frozen=True)
class TransformerChoices:
    """What one ``attentions[index]`` that is a ``Transformer2DModel`` may become.

    The genes apply to every kept layer alike (the teacher's layers all have one shape)."""

    index: int
    channels: int  # the transformer's input and output channels
    inner_dim: int  # proj_in's width (the teacher's heads * head_dim), which genomes do not change
    head_dim: int
    cross_attention_dim: int  # the width of encoder_hidden_states
    self_heads: tuple[int, ...]  # attn1 head counts, ascending; the last is the teacher's
    cross_heads: tuple[int, ...]  # attn2 head counts, ascending; the last is the teacher's
    ff_widths: tuple[int, ...]  # GEGLU inner widths, ascending; the last is the teacher's
    ff_labels: tuple[str, ...]  # the ratio each width stands for ("0.5", "0.75", "1.0")
    layers: int  # the teacher's number of BasicTransformerBlocks

    def teacher_genes(self) -> tuple[int, ...]:
        return (1, len(self.self_heads) - 1, len(self.cross_heads) - 1, len(self.ff_widths) - 1, self.layers - 1)


@dataclass(frozen=True)
class ResnetArch:
    """One resnet as a genome fixes it. ``hidden == 0`` means skip."""

    kernel1: int
    kernel2: int
    hidden: int

    @property
    def skip(self) -> bool:
        return self.hidden == 0


@dataclass(frozen=True)
class AttentionArch:
    """One attention as a genome fixes it. ``heads == 0`` means drop."""

    heads: int
    head_dim: int

    @property
    def dropped(self) -> bool:
        return self.heads == 0


@dataclass(frozen=True)
class TransformerArch:
    """One Transformer2DModel as a genome fixes it. ``layers == 0`` means drop (the other fields are
    then the teacher's)."""

    layers: int
    self_heads: int
    cross_heads: int
    head_dim: int
    ff_inner: int

    @property
    def dropped(self) -> bool:
        return self.layers == 0


@dataclass(frozen=True)
class BlockArch:
    """A decoded block genome: per searchable layer, its concrete shape (keyed by list index)."""

    resnets: dict[int, ResnetArch]
    attentions: dict[int, AttentionArch]
    transformers: dict[int, TransformerArch] = field(default_factory=dict)


@dataclass(frozen=True)
class BlockSpace:
    """The genomes of one teacher block (``"down_blocks.1"``, ``"mid_block"``, ``"up_blocks.0"``)."""

    name: str
    block_type: str
    resnets: tuple[ResnetChoices, ...]
    attentions: tuple[AttentionChoices, ...]
    transformers: tuple[TransformerChoices, ...] = ()

    # ----------------------------------------------------------------- genes
    @cached_property  # read on every validate; a frozen dataclass may still cache in its __dict__
    def genes(self) -> tuple[Gene, ...]:
        genes: list[Gene] = []
        for r in self.resnets:
            kernels = tuple(f"k{k}" for k in KERNEL_SIZES)
            genes.append(Gene(f"r{r.index}.k1", kernels))
            genes.append(Gene(f"r{r.index}.k2", kernels))
            genes.append(Gene(f"r{r.index}.width", ("skip",) + tuple(f"w{label}" for label in r.width_labels)))
        for a in self.attentions:
            genes.append(Gene(f"a{a.index}.heads", ("drop",) + tuple(f"h{h}" for h in a.heads)))
        for t in self.transformers:
            genes.append(Gene(f"t{t.index}.keep", ("drop", "keep")))
            genes.append(Gene(f"t{t.index}.self_heads", tuple(f"h{h}" for h in t.self_heads)))
            genes.append(Gene(f"t{t.index}.cross_heads", tuple(f"x{h}" for h in t.cross_heads)))
            genes.append(Gene(f"t{t.index}.ff", tuple(f"f{label}" for label in t.ff_labels)))
            genes.append(Gene(f"t{t.index}.layers", tuple(f"l{n}" for n in range(1, t.layers + 1))))
        return tuple(genes)

    @property
    def num_choices(self) -> tuple[int, ...]:
        """Choices per gene, in gene order (for integer mutation)."""
        return tuple(g.num_choices for g in self.genes)

    def __len__(self) -> int:
        return 3 * len(self.resnets) + len(self.attentions) + TRANSFORMER_GENES * len(self.transformers)

    def _resnet_genes(self, genome: Genome) -> Iterator[tuple[ResnetChoices, int, int, int]]:
        for n, r in enumerate(self.resnets):
            yield r, genome[3 * n], genome[3 * n + 1], genome[3 * n + 2]

    def _attention_genes(self, genome: Genome) -> Iterator[tuple[AttentionChoices, int]]:
        offset = 3 * len(self.resnets)
        for n, a in enumerate(self.attentions):
            yield a, genome[offset + n]

    def _transformer_offset(self, n: int) -> int:
        return 3 * len(self.resnets) + len(self.attentions) + TRANSFORMER_GENES * n

    def _transformer_genes(self, genome: Genome) -> Iterator[tuple[TransformerChoices, tuple[int, ...]]]:
        for n, t in enumerate(self.transformers):
            offset = self._transformer_offset(n)
            yield t, tuple(genome[offset:offset + TRANSFORMER_GENES])

    # ------------------------------------------------------- special genomes
    def teacher_genome(self) -> Genome:
        genes: list[int] = []
        for r in self.resnets:
            genes += [KERNEL_SIZES.index(r.teacher_kernel1), KERNEL_SIZES.index(r.teacher_kernel2), len(r.widths)]
        genes += [len(a.heads) for a in self.attentions]
        for t in self.transformers:
            genes += t.teacher_genes()
        return tuple(genes)

    def largest_genome(self) -> Genome:
        genes: list[int] = []
        for r in self.resnets:
            genes += [len(KERNEL_SIZES) - 1, len(KERNEL_SIZES) - 1, len(r.widths)]
        genes += [len(a.heads) for a in self.attentions]
        for t in self.transformers:
            genes += t.teacher_genes()
        return tuple(genes)

    def smallest_genome(self) -> Genome:
        """The smallest genome without skips or drops (the sandwich rule's lower path)."""
        genes: list[int] = []
        for _ in self.resnets:
            genes += [0, 0, 1]
        genes += [1 for _ in self.attentions]
        for _ in self.transformers:
            genes += [1, 0, 0, 0, 0]
        return tuple(genes)

    def narrow_genome(self) -> Genome:
        """The teacher's kernels, heads and layers at the narrowest hidden widths (resnets' hidden
        channels, transformers' feed-forward): the natural cheap candidate."""
        genes = list(self.teacher_genome())
        for n in range(len(self.resnets)):
            genes[3 * n + 2] = 1
        for n in range(len(self.transformers)):
            genes[self._transformer_offset(n) + 3] = 0
        return tuple(genes)

    def minimal_genome(self) -> Genome:
        """Every resnet skipped and every attention and transformer dropped: the least a block can do
        (and cost)."""
        return self.canonical(tuple(0 for _ in self.num_choices))

    def random_genome(self, rng: random.Random) -> Genome:
        """Uniform over each gene's choices, then made canonical."""
        return self.canonical(tuple(rng.randrange(n) for n in self.num_choices))

    def num_genomes(self) -> int:
        """The number of distinct architectures (canonical genomes) of this block."""
        total = 1
        for r in self.resnets:
            total *= 1 + len(r.widths) * len(KERNEL_SIZES) ** 2
        for a in self.attentions:
            total *= 1 + len(a.heads)
        for t in self.transformers:
            total *= 1 + len(t.self_heads) * len(t.cross_heads) * len(t.ff_widths) * t.layers
        return total

    # ------------------------------------------------------------ validation
    def validate(self, genome: Sequence[int]) -> Genome:
        """The genome as a tuple of ints, or a ValueError saying what is wrong with it."""
        genome = tuple(genome)
        genes = self.genes
        if len(genome) != len(genes):
            raise ValueError(f"{self.name}: a genome has {len(genes)} genes "
                             f"({', '.join(g.name for g in genes)}), got {len(genome)}: {genome}")
        for gene, value in zip(genes, genome):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < gene.num_choices:
                raise ValueError(f"{self.name}: gene {gene.name} takes 0..{gene.num_choices - 1} "
                                 f"({', '.join(gene.labels)}), got {value!r}")
        return genome

    def canonical(self, genome: Sequence[int]) -> Genome:
        """The same architecture with the kernel genes of skipped resnets and the shape genes of dropped
        transformers set to the teacher's."""
        genes = list(self.validate(genome))
        for n, (r, _, _, width) in enumerate(self._resnet_genes(tuple(genes))):
            if width == 0:
                genes[3 * n] = KERNEL_SIZES.index(r.teacher_kernel1)
                genes[3 * n + 1] = KERNEL_SIZES.index(r.teacher_kernel2)
        for n, (t, values) in enumerate(self._transformer_genes(tuple(genes))):
            if values[0] == 0:
                offset = self._transformer_offset(n)
                genes[offset:offset + TRANSFORMER_GENES] = (0,) + t.teacher_genes()[1:]
        return tuple(genes)

    # ---------------------------------------------------------------- decode
    def arch(self, genome: Sequence[int]) -> BlockArch:
        """The concrete layer shapes a genome stands for."""
        genome = self.validate(genome)
        resnets = {}
        for r, k1, k2, width in self._resnet_genes(genome):
            if width == 0:
                resnets[r.index] = ResnetArch(r.teacher_kernel1, r.teacher_kernel2, 0)
            else:
                resnets[r.index] = ResnetArch(KERNEL_SIZES[k1], KERNEL_SIZES[k2], r.widths[width - 1])
        attentions = {}
        for a, heads in self._attention_genes(genome):
            attentions[a.index] = AttentionArch(0 if heads == 0 else a.heads[heads - 1], a.head_dim)
        transformers = {}
        for t, (keep, self_heads, cross_heads, ff, layers) in self._transformer_genes(genome):
            if keep == 0:  # the teacher's shape genes, whatever the genome holds
                _, self_heads, cross_heads, ff, layers = t.teacher_genes()
            transformers[t.index] = TransformerArch(layers + 1 if keep else 0, t.self_heads[self_heads],
                                                    t.cross_heads[cross_heads], t.head_dim, t.ff_widths[ff])
        return BlockArch(resnets, attentions, transformers)

    # --------------------------------------------------------------- strings
    def encode(self, genome: Sequence[int]) -> str:
        """Stable string form, e.g. ``"r0:k3k3w1.0,r1:skip,a0:h4"`` (of the canonical genome)."""
        genome = self.canonical(genome)
        parts = []
        for r, k1, k2, width in self._resnet_genes(genome):
            if width == 0:
                parts.append(f"r{r.index}:skip")
            else:
                parts.append(f"r{r.index}:k{KERNEL_SIZES[k1]}k{KERNEL_SIZES[k2]}w{r.width_labels[width - 1]}")
        for a, heads in self._attention_genes(genome):
            parts.append(f"a{a.index}:drop" if heads == 0 else f"a{a.index}:h{a.heads[heads - 1]}")
        for t, (keep, self_heads, cross_heads, ff, layers) in self._transformer_genes(genome):
            if keep == 0:
                parts.append(f"t{t.index}:drop")
            else:
                parts.append(f"t{t.index}:h{t.self_heads[self_heads]}x{t.cross_heads[cross_heads]}"
                             f"f{t.ff_labels[ff]}l{layers + 1}")
        return ",".join(parts)

    def decode(self, text: str) -> Genome:
        """The canonical genome of an ``encode`` string; ValueError naming what does not parse."""
        resnets = {r.index: r for r in self.resnets}
        attentions = {a.index: a for a in self.attentions}
        transformers = {t.index: t for t in self.transformers}
        values: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            match = _LAYER_RE.fullmatch(part)
            if match is None:
                raise ValueError(f"{self.name}: cannot parse {part!r} in {text!r} "
                                 "(expected e.g. 'r0:k3k3w1.0', 'r1:skip', 'a0:h4', 'a0:drop', 't0:h8x8f1.0l1', "
                                 "'t0:drop')")
            kind, index, value = match.group(1), int(match.group(2)), match.group(3)
            key = f"{kind}{index}"
            if key in values:
                raise ValueError(f"{self.name}: {key} appears twice in {text!r}")
            if kind == "r":
                if index not in resnets:
                    raise ValueError(f"{self.name}: no searchable resnet {index} (has {sorted(resnets)})")
                values[key] = _decode_resnet(self.name, resnets[index], value)
            elif kind == "t":
                if index not in transformers:
                    raise ValueError(f"{self.name}: no searchable transformer {index} (has {sorted(transformers)})")
                values[key] = _decode_transformer(self.name, transformers[index], value)
            else:
                if index not in attentions:
                    raise ValueError(f"{self.name}: no searchable attention {index} (has {sorted(attentions)})")
                values[key] = _decode_attention(self.name, attentions[index], value)
        expected = ([f"r{r.index}" for r in self.resnets] + [f"a{a.index}" for a in self.attentions]
                    + [f"t{t.index}" for t in self.transformers])
        missing = [key for key in expected if key not in values]
        if missing:
            raise ValueError(f"{self.name}: {text!r} does not give {', '.join(missing)}")
        genes: list[int] = []
        for r in self.resnets:
            genes += values[f"r{r.index}"]
        genes += [values[f"a{a.index}"] for a in self.attentions]
        for t in self.transformers:
            genes += values[f"t{t.index}"]
        return self.canonical(genes)


_LAYER_RE = re.compile(r"([rat])(\d+):(\S+)")
_RESNET_RE = re.compile(r"k(\d+)k(\d+)w([0-9.]+)")
_TRANSFORMER_RE = re.compile(r"h(\d+)x(\d+)f([0-9.]+)l(\d+)")


def _decode_resnet(block: str, choices: ResnetChoices, value: str) -> tuple[int, int, int]:
    if value == "skip":
        return (KERNEL_SIZES.index(choices.teacher_kernel1), KERNEL_SIZES.index(choices.teacher_kernel2), 0)
    match = _RESNET_RE.fullmatch(value)
    if match is None:
        raise ValueError(f"{block}: r{choices.index} must be 'skip' or 'k<k1>k<k2>w<ratio>', got {value!r}")
    k1, k2, ratio = int(match.group(1)), int(match.group(2)), match.group(3)
    for k in (k1, k2):
        if k not in KERNEL_SIZES:
            raise ValueError(f"{block}: r{choices.index} kernel {k} is not one of {KERNEL_SIZES}")
    if ratio not in choices.width_labels:
        raise ValueError(f"{block}: r{choices.index} width {ratio} is not one of {choices.width_labels}")
    return KERNEL_SIZES.index(k1), KERNEL_SIZES.index(k2), 1 + choices.width_labels.index(ratio)


def _decode_attention(block: str, choices: AttentionChoices, value: str) -> int:
    if value == "drop":
        return 0
    if value.startswith("h") and value[1:].isdigit() and int(value[1:]) in choices.heads:
        return 1 + choices.heads.index(int(value[1:]))
    raise ValueError(f"{block}: a{choices.index} must be 'drop' or one of "
                     f"{', '.join(f'h{h}' for h in choices.heads)}, got {value!r}")


def _decode_transformer(block: str, choices: TransformerChoices, value: str) -> tuple[int, ...]:
    if value == "drop":
        return (0,) + choices.teacher_genes()[1:]
    where = f"{block}: t{choices.index}"
    match = _TRANSFORMER_RE.fullmatch(value)
    if match is None:
        raise ValueError(f"{where} must be 'drop' or 'h<self heads>x<cross heads>f<ratio>l<layers>' "
                         f"(e.g. 'h{choices.self_heads[-1]}x{choices.cross_heads[-1]}f{choices.ff_labels[-1]}"
                         f"l{choices.layers}'), got {value!r}")
    self_heads, cross_heads, layers = int(match.group(1)), int(match.group(2)), int(match.group(4))
    ratio = match.group(3)
    if self_heads not in choices.self_heads:
        raise ValueError(f"{where} self-attention heads {self_heads} is not one of {choices.self_heads}")
    if cross_heads not in choices.cross_heads:
        raise ValueError(f"{where} cross-attention heads {cross_heads} is not one of {choices.cross_heads}")
    if ratio not in choices.ff_labels:
        raise ValueError(f"{where} feed-forward ratio {ratio} is not one of {choices.ff_labels}")
    if not 1 <= layers <= choices.layers:
        raise ValueError(f"{where} keeps 1..{choices.layers} layers, got {layers}")
    return (1, choices.self_heads.index(self_heads), choices.cross_heads.index(cross_heads),
            choices.ff_labels.index(ratio), layers - 1)


# ---------------------------------------------------------------- the teacher
def searchable_blocks(unet: nn.Module) -> dict[str, nn.Module]:
    """A UNet's searchable blocks by dotted name, in forward order."""
    blocks: dict[str, nn.Module] = {}
    for index, block in enumerate(unet.down_blocks):
        blocks[f"down_blocks.{index}"] = block
    if getattr(unet, "mid_block", None) is not None:
        blocks["mid_block"] = unet.mid_block
    for index, block in enumerate(unet.up_blocks):
        blocks[f"up_blocks.{index}"] = block
    return blocks


def unet_space(unet: nn.Module) -> list[BlockSpace]:
    """The search space of every searchable block of a diffusers UNet, in forward order."""
    return [block_space(name, block) for name, block in searchable_blocks(unet).items()]


def block_space(name: str, block: nn.Module) -> BlockSpace:
    """The search space of one diffusers block; UnsupportedBlockError when it holds other layers."""
    block_type = type(block).__name__
    resnets = getattr(block, "resnets", None)
    if not isinstance(resnets, nn.ModuleList) or len(resnets) == 0:
        raise UnsupportedBlockError(f"{name} ({block_type}): pyevo searches blocks made of "
                                    "ResnetBlock2D layers in `resnets`; this block has none")
    resnet_choices = tuple(_resnet_choices(name, block_type, i, r) for i, r in enumerate(resnets))
    attention_choices, transformer_choices = [], []
    for j, attention in enumerate(getattr(block, "attentions", None) or []):
        if isinstance(attention, Transformer2DModel):
            transformer_choices.append(_transformer_choices(name, block_type, j, attention))
        elif attention is not None:
            attention_choices.append(_attention_choices(name, block_type, j, attention))
    return BlockSpace(name, block_type, resnet_choices, tuple(attention_choices), tuple(transformer_choices))


def _resnet_choices(name: str, block_type: str, index: int, resnet: nn.Module) -> ResnetChoices:
    where = f"{name} ({block_type}) resnets[{index}]"
    if type(resnet) is not ResnetBlock2D:
        raise UnsupportedBlockError(f"{where} is a {type(resnet).__name__}; pyevo searches only "
                                    "diffusers ResnetBlock2D resnets")
    if not isinstance(resnet.nonlinearity, nn.SiLU):
        raise UnsupportedBlockError(f"{where} uses {type(resnet.nonlinearity).__name__}; "
                                    "pyevo's fused GroupNorm+activation supports SiLU only")
    if resnet.time_embedding_norm not in ("default", "scale_shift"):
        raise UnsupportedBlockError(f"{where} has time_embedding_norm={resnet.time_embedding_norm!r}")
    for conv in (resnet.conv1, resnet.conv2):
        if conv.kernel_size[0] != conv.kernel_size[1] or conv.kernel_size[0] not in KERNEL_SIZES \
                or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise UnsupportedBlockError(f"{where} has a conv pyevo cannot share: kernel {conv.kernel_size}, "
                                        f"stride {conv.stride}, dilation {conv.dilation}, groups {conv.groups}")
    hidden = resnet.conv1.out_channels
    groups = resnet.norm2.num_groups
    per_group = hidden // groups
    widths: dict[int, str] = {}
    for ratio in sorted(WIDTH_RATIOS, reverse=True):  # the largest ratio names a shared width
        width = max(1, math.floor(ratio * groups + 0.5)) * per_group
        widths.setdefault(width, str(ratio))
    ordered = sorted(widths)
    return ResnetChoices(index=index, in_channels=resnet.conv1.in_channels, out_channels=resnet.conv2.out_channels,
                         teacher_hidden=hidden, channels_per_group=per_group, widths=tuple(ordered),
                         width_labels=tuple(widths[w] for w in ordered),
                         teacher_kernel1=resnet.conv1.kernel_size[0], teacher_kernel2=resnet.conv2.kernel_size[0])


def _attention_problems(attention: Attention) -> dict[str, bool]:
    """What in a diffusers Attention the shared-projection attention (pyevo::shared_attention) does not
    compute, by name, whatever the attention is used for."""
    return {
        "added key/value projections": attention.added_kv_proj_dim is not None,
        "spatial norm": attention.spatial_norm is not None,
        "q/k norm": attention.norm_q is not None,
        "cross-attention norm": attention.norm_cross is not None,
        "an output projection other than to_out": attention.to_out is None or attention.to_add_out is not None,
        "key/value heads other than the query heads": attention.inner_kv_dim != attention.inner_dim,
        "a processor other than AttnProcessor/AttnProcessor2_0":
            type(attention.processor) not in (AttnProcessor, AttnProcessor2_0),
        "an output width other than its input": attention.out_dim != attention.query_dim,
        "a non-default scale": attention.scale != (attention.inner_dim // attention.heads) ** -0.5,
    }


def _refuse(where: str, problems: Mapping[str, bool]) -> None:
    for what, present in problems.items():
        if present:
            raise UnsupportedBlockError(f"{where} has {what}; pyevo cannot search it")


def _kept_heads(heads: int) -> tuple[int, ...]:
    """Head counts a head gene offers: half the teacher's (rounded up) and all, merged when equal."""
    return tuple(sorted({max(1, math.ceil(ratio * heads)) for ratio in HEAD_RATIOS}))


def _attention_choices(name: str, block_type: str, index: int, attention: nn.Module) -> AttentionChoices:
    where = f"{name} ({block_type}) attentions[{index}]"
    if type(attention) is not Attention:
        raise UnsupportedBlockError(f"{where} is a {type(attention).__name__}; pyevo searches only "
                                    "diffusers Attention (self-attention) and Transformer2DModel layers")
    _refuse(where, {"cross-attention": attention.is_cross_attention, **_attention_problems(attention)})
    return AttentionChoices(index=index, channels=attention.query_dim,
                            head_dim=attention.inner_dim // attention.heads, heads=_kept_heads(attention.heads))


def _transformer_choices(name: str, block_type: str, index: int, transformer: Transformer2DModel) -> TransformerChoices:
    """The genes of a Transformer2DModel of continuous input whose layers are BasicTransformerBlocks of
    layer-normed self-attention, cross-attention and GEGLU feed-forward, all of one shape (what
    UNet2DConditionModel builds); every other variant is refused by name."""
    where = f"{name} ({block_type}) attentions[{index}]"
    if type(transformer) is not Transformer2DModel:
        raise UnsupportedBlockError(f"{where} is a {type(transformer).__name__}; pyevo searches only "
                                    "diffusers Transformer2DModel transformers")
    config = transformer.config
    where = f"{where} (Transformer2DModel)"
    _refuse(where, {
        "discrete (vectorized) or patched input": not transformer.is_input_continuous,
        "num_embeds_ada_norm (an ada-norm)": config.num_embeds_ada_norm is not None,
        f"norm_type={config.norm_type!r}": config.norm_type != "layer_norm",
        "only_cross_attention": bool(config.only_cross_attention),
        "double_self_attention": bool(config.double_self_attention),
        f"attention_type={config.attention_type!r}": config.attention_type != "default",
        f"activation_fn={config.activation_fn!r} (pyevo searches GEGLU feed-forwards)": config.activation_fn != "geglu",
        "no cross-attention (cross_attention_dim=None)": config.cross_attention_dim is None,
        "an output width other than its input": transformer.out_channels != transformer.in_channels,
        "no transformer layers": len(transformer.transformer_blocks) == 0,
    })
    shapes = set()
    for n, layer in enumerate(transformer.transformer_blocks):
        layer_where = f"{where} transformer_blocks[{n}]"
        if type(layer) is not BasicTransformerBlock:
            raise UnsupportedBlockError(f"{layer_where} is a {type(layer).__name__}; pyevo searches only "
                                        "diffusers BasicTransformerBlock layers")
        ff = layer.ff
        _refuse(layer_where, {
            f"norm_type={layer.norm_type!r}": layer.norm_type != "layer_norm",
            "positional embeddings": layer.pos_embed is not None,
            "a gated (GLIGEN) fuser": hasattr(layer, "fuser"),
            "no cross-attention": layer.attn2 is None,
            "a feed-forward other than diffusers FeedForward(GEGLU, Dropout, Linear)":
                type(ff) is not FeedForward or len(ff.net) != 3 or type(ff.net[0]) is not GEGLU,
        })
        for attention_name, cross in (("attn1", False), ("attn2", True)):
            attention = getattr(layer, attention_name)
            attention_where = f"{layer_where}.{attention_name}"
            if type(attention) is not Attention:
                raise UnsupportedBlockError(f"{attention_where} is a {type(attention).__name__}; pyevo searches "
                                            "only diffusers Attention layers")
            _refuse(attention_where, {
                "cross-attention (expected self-attention)" if not cross else "self-attention (expected "
                "cross-attention)": attention.is_cross_attention != cross,
                "a group norm": attention.group_norm is not None,
                "a residual connection": attention.residual_connection,
                "a rescaled output": attention.rescale_output_factor != 1.0,
                **_attention_problems(attention),
            })
        shapes.add((layer.attn1.heads, layer.attn1.inner_dim, layer.attn2.heads, layer.attn2.inner_dim,
                    layer.attn2.cross_attention_dim, ff.net[2].in_features))
    if len(shapes) != 1:
        raise UnsupportedBlockError(f"{where} has layers of different shapes; pyevo cannot search it")
    self_heads, self_inner, cross_heads, cross_inner, cross_dim, ff_inner = shapes.pop()
    head_dim = self_inner // self_heads
    if cross_inner // cross_heads != head_dim:
        raise UnsupportedBlockError(f"{where} has self- and cross-attention heads of different sizes; "
                                    "pyevo cannot search it")
    widths: dict[int, str] = {}
    for ratio in sorted(FF_RATIOS, reverse=True):  # the largest ratio names a shared width
        widths.setdefault(max(1, math.floor(ratio * ff_inner + 0.5)), str(ratio))
    ordered = sorted(widths)
    return TransformerChoices(index=index, channels=transformer.in_channels, inner_dim=transformer.inner_dim,
                              head_dim=head_dim, cross_attention_dim=cross_dim, self_heads=_kept_heads(self_heads),
                              cross_heads=_kept_heads(cross_heads), ff_widths=tuple(ordered),
                              ff_labels=tuple(widths[w] for w in ordered),
                              layers=len(transformer.transformer_blocks))


# ----------------------------------------------------------- network genomes
def teacher_network(spaces: Sequence[BlockSpace]) -> NetworkGenome:
    return {space.name: space.teacher_genome() for space in spaces}


def encode_network(genomes: Mapping[str, Sequence[int]], spaces: Sequence[BlockSpace]) -> str:
    """``"down_blocks.0=r0:k3k3w1.0,...;mid_block=...;..."`` in the spaces' (forward) order."""
    names = [space.name for space in spaces]
    if set(genomes) != set(names):
        raise ValueError(f"a network genome needs exactly the blocks {names}, got {sorted(genomes)}")
    return ";".join(f"{space.name}={space.encode(genomes[space.name])}" for space in spaces)


def decode_network(text: str, spaces: Sequence[BlockSpace]) -> NetworkGenome:
    """The network genome of an ``encode_network`` string; every block must appear once."""
    by_name = {space.name: space for space in spaces}
    genomes: NetworkGenome = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, block_text = part.partition("=")
        if not sep:
            raise ValueError(f"cannot parse {part!r} in a network genome (expected '<block>=<genome>')")
        if name not in by_name:
            raise ValueError(f"network genome names {name!r}, which is not a searchable block "
                             f"(blocks: {', '.join(by_name)})")
        if name in genomes:
            raise ValueError(f"network genome gives {name} twice")
        genomes[name] = by_name[name].decode(block_text)
    missing = [name for name in by_name if name not in genomes]
    if missing:
        raise ValueError(f"network genome does not give {', '.join(missing)}")
    return {name: genomes[name] for name in by_name}
