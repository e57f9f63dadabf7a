"""Batched candidate evaluation for the local search: the NSRs of many genomes of one block at once.

The per-candidate path (:func:`pyevo.distill.block_nsr`) sets a genome on the super-block and runs
the block over the held-out set, one genome after another. :class:`PopulationEvaluator` runs a
whole generation's genomes of one block together, layer by layer:

* the block's recorded inputs are repeated once per candidate along the batch, so diffusers' own
  block forward (samplers, skip concatenations, residual tuples) runs unchanged on K x N rows;
* every searched layer (``SuperResnetBlock2D``, ``SuperAttention``) is switched to a population
  forward for the duration of the call: its convolutions, GroupNorm+SiLU and attention run as
  ``pyevo.ops.population_*`` ops, one call for all candidates that use the layer (one kernel
  launch on CUDA, except the convolutions, which loop over cuDNN);
* at the block's first searched layer every candidate sees the same input, so work is shared:
  the shortcut and first norm run once; a resnet runs conv1 once per kernel size at the widest
  width any candidate of that size asks for, each candidate taking a channel prefix, the
  time-embedding add and GroupNorm+SiLU once per such group, and conv2 as a running sum over
  channel slabs, so that a group costs one conv at its widest width
  (:func:`_shared_input_resnet_branches`); an attention projects once for the most heads. After
  it, each candidate reads its own rows;
* the output rows of candidate i are compared with the teacher's, chunk by chunk, exactly as
  ``block_nsr`` aggregates them.

Candidates are processed in groups of at most ``max_rows // chunk`` so that K x N rows stay within
memory. The dense weight crops of the summed slabs are made once per call (one generation). On the CPU the population ops are loops over the single-candidate ops, so the NSRs equal
the per-candidate path's up to float rounding (non-searched layers such as the samplers run on a
K-times larger batch, which may change the order of sums); tests/test_population_ops.py checks it.

The search uses it through :func:`pyevo.search.local.search_block`: an ``evaluate`` callable with a
``many`` method gets a generation's new genomes in one call. Population ops are forward only; the
evaluator runs under ``torch.no_grad``.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from pyevo import ops
from pyevo.distill import block_nsr
from pyevo.space import Genome
from pyevo.supernet import SharedConv2d, SuperAttention, SuperBlock, SuperResnetBlock2D
from pyevo.teacher import BlockCall, _map_tensors, noise_to_signal, output_tensors

log = logging.getLogger(__name__)

__all__ = ["PopulationEvaluator", "block_evaluator", "population_nsr"]


@dataclass
class _PopulationState:
    """What the population forwards of one block call share: K candidates of N rows each, and
    whether the rows of different candidates may differ yet (False until the first searched layer
    ran: before it every candidate's rows are the same copy of the block input)."""

    candidates: int
    rows: int
    crops: "_WeightCrops"
    diverged: bool = False

    def part(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        return tensor[index * self.rows:(index + 1) * self.rows]


class _WeightCrops:
    """Dense crops of shared conv weights, made once per generation (one ``population_nsr`` call, whose
    weights do not change) and reused by every chunk and candidate group that needs them."""

    def __init__(self):
        self._crops: dict[tuple, torch.Tensor] = {}

    def input_slab(self, conv: SharedConv2d, first: int, end: int, kernel_size: int) -> torch.Tensor:
        """``conv.weight[:, first:end]``, its kernel cropped to the centred ``kernel_size`` square."""
        key = (id(conv), first, end, kernel_size)
        crop = self._crops.get(key)
        if crop is None:
            ring = (conv.weight.shape[-1] - kernel_size) // 2
            crop = conv.weight[:, first:end, ring:ring + kernel_size, ring:ring + kernel_size].contiguous()
            self._crops[key] = crop
        return crop


def _time_embedding_and_norm2(layer: SuperResnetBlock2D, hidden: list[torch.Tensor],
                              temb_rows: torch.Tensor | None) -> list[torch.Tensor]:
    """conv1's outputs (each at its own hidden width) through the time embedding and norm2 + SiLU, as
    ``SuperResnetBlock2D.forward`` takes them: GroupNorm+SiLU as one population op where the
    embedding is added, GroupNorm, scale/shift and SiLU one by one where it modulates."""
    if layer.config.time_embedding_norm == "default":
        if temb_rows is not None:
            hidden = [h + layer._time_embedding(temb_rows, h.shape[1])[0] for h in hidden]
        return ops.population_group_norm_silu(hidden, layer.norm2.weight, layer.norm2.bias,
                                              layer.norm2.channels_per_group, layer.norm2.eps)
    modulated = []
    for h in hidden:
        scale, shift = layer._time_embedding(temb_rows, h.shape[1])
        modulated.append(F.silu(layer.norm2(h) * (1 + scale) + shift))
    return modulated


def _shared_input_resnet_branches(layer: SuperResnetBlock2D, archs, active: list[int], hidden_in: torch.Tensor,
                                  temb_rows: torch.Tensor | None, crops: _WeightCrops) -> dict[int, torch.Tensor]:
    """The residual branch (conv2's output) of each active candidate of a block's first searched resnet,
    where every candidate reads the same input, computed once per group of candidates.

    Three identities of the importance-ordered shared weights make this exact up to float rounding:

    * conv1's output channel j reads weight row j alone, so candidates with the same ``kernel1`` take
      channel prefixes of one convolution at the group's widest hidden width (views, no copies);
    * the time-embedding projection's rows likewise, and GroupNorm's groups have a fixed number of
      channels, so a prefix's statistics are the prefix's: the add and GroupNorm+SiLU run once per group;
    * conv2 sums over its input channels, so the group's candidates of one ``kernel2``, taken from the
      narrowest, each add the slab of channels beyond the previous width to a running sum: the whole
      subgroup costs one convolution at its widest width.
    """
    config = layer.config
    groups: dict[int, list[int]] = {}
    for i in active:
        groups.setdefault(archs[i].kernel1, []).append(i)
    kernels = list(groups)
    widest = [max(archs[i].hidden for i in groups[k]) for k in kernels]
    hidden = ops.population_conv2d([hidden_in], layer.conv1.weight, layer.conv1.bias, [], widest, kernels)
    hidden = _time_embedding_and_norm2(layer, hidden, temb_rows)
    bias = None if layer.conv2.bias is None else layer.conv2.bias[:config.out_channels, None, None]
    branches: dict[int, torch.Tensor] = {}
    for kernel1, h in zip(kernels, hidden):
        h = layer.dropout(h)
        by_kernel2: dict[int, list[int]] = {}
        for i in groups[kernel1]:
            by_kernel2.setdefault(archs[i].kernel2, []).append(i)
        for kernel2, members in by_kernel2.items():
            total, done = None, 0
            for width in sorted({archs[i].hidden for i in members}):
                slab = F.conv2d(h[:, done:width], crops.input_slab(layer.conv2, done, width, kernel2),
                                padding=kernel2 // 2)
                total = slab if total is None else total + slab
                done = width
                out = total if bias is None else total + bias
                for i in members:
                    if archs[i].hidden == width:
                        branches[i] = out
    return branches


def _resnet_population_forward(layer: SuperResnetBlock2D, archs, state: _PopulationState,
                               input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs
                               ) -> torch.Tensor:
    """``SuperResnetBlock2D.forward`` for every candidate's arch at once (same arithmetic)."""
    config, n = layer.config, state.rows
    shared = not state.diverged
    x = input_tensor[:n] if shared else input_tensor
    shortcut = layer._sample(x)
    if layer.conv_shortcut is not None:
        shortcut = layer.conv_shortcut(shortcut)
    if layer.time_emb_proj is None and temb is not None:
        raise ValueError("this resnet has no time_emb_proj (temb_channels=None) but was given temb")
    if config.time_embedding_norm != "default" and temb is None:
        raise ValueError("temb must be given when time_embedding_norm is 'scale_shift'")
    temb_rows = None if temb is None else temb[:n]  # the same rows for every candidate

    def shortcut_of(i: int) -> torch.Tensor:
        return shortcut if shared else state.part(shortcut, i)

    outputs: list[torch.Tensor | None] = [None] * len(archs)
    active = [i for i, arch in enumerate(archs) if not arch.skip]
    if active and shared:
        hidden_in = layer._sample(layer.norm1.forward_silu(x))
        for i, h in _shared_input_resnet_branches(layer, archs, active, hidden_in, temb_rows, state.crops).items():
            outputs[i] = (shortcut + h) / config.output_scale_factor
    elif active:
        hidden_in = layer._sample(layer.norm1.forward_silu(x))
        conv1_inputs = [state.part(hidden_in, i) for i in active]
        hidden = ops.population_conv2d(conv1_inputs, layer.conv1.weight, layer.conv1.bias, [],
                                       [archs[i].hidden for i in active], [archs[i].kernel1 for i in active])
        hidden = [layer.dropout(h) for h in _time_embedding_and_norm2(layer, hidden, temb_rows)]
        hidden = ops.population_conv2d(hidden, layer.conv2.weight, layer.conv2.bias, [],
                                       [config.out_channels] * len(active), [archs[i].kernel2 for i in active])
        for h, i in zip(hidden, active):
            outputs[i] = (shortcut_of(i) + h) / config.output_scale_factor
    for i, arch in enumerate(archs):
        if arch.skip:
            outputs[i] = shortcut_of(i) / config.output_scale_factor
    state.diverged = True
    return torch.cat(outputs)


def _attention_population_forward(layer: SuperAttention, archs, state: _PopulationState,
                                  hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                                  attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """``SuperAttention.forward`` for every candidate's arch at once (same arithmetic)."""
    layer.check_self_attention(encoder_hidden_states, attention_mask)
    n = state.rows
    shared = not state.diverged
    source = hidden_states[:n] if shared else hidden_states
    outputs: list[torch.Tensor | None] = [None] * len(archs)
    kept = [i for i, arch in enumerate(archs) if not arch.dropped]
    if kept:
        x = layer.normed_sequence(source)
        inputs = [x] if shared else [state.part(x, i) for i in kept]
        out_linear = layer.to_out[0]
        attended = ops.population_attention(
            inputs, layer.to_q.weight, layer.to_q.bias, layer.to_k.weight, layer.to_k.bias, layer.to_v.weight,
            layer.to_v.bias, out_linear.weight, out_linear.bias, [archs[i].heads for i in kept],
            layer.config.head_dim)
        for out, i in zip(attended, kept):
            outputs[i] = layer.finish(out, source if shared else state.part(source, i))
    for i, arch in enumerate(archs):
        if arch.dropped:
            outputs[i] = source if shared else state.part(source, i)
    state.diverged = True
    return torch.cat(outputs)


@contextmanager
def _population_mode(block: SuperBlock, genomes: Sequence[Genome], rows: int,
                     crops: _WeightCrops) -> Iterator[_PopulationState]:
    """Switches the block's searched layers to their population forwards for ``genomes``."""
    archs = [block.space.arch(genome) for genome in genomes]
    state = _PopulationState(len(genomes), rows, crops)
    patched = []
    try:
        for choices in block.space.resnets:
            layer = block.block.resnets[choices.index]
            layer_archs = [arch.resnets[choices.index] for arch in archs]
            layer.forward = (lambda *a, _l=layer, _s=layer_archs, **k: _resnet_population_forward(_l, _s, state, *a, **k))
            patched.append(layer)
        for choices in block.space.attentions:
            layer = block.block.attentions[choices.index]
            layer_archs = [arch.attentions[choices.index] for arch in archs]
            layer.forward = (lambda *a, _l=layer, _s=layer_archs, **k: _attention_population_forward(_l, _s, state, *a, **k))
            patched.append(layer)
        yield state
    finally:
        for layer in patched:
            del layer.forward  # the class's forward again


@torch.no_grad()
def population_nsr(block: SuperBlock, call: BlockCall, genomes: Sequence[Genome], chunk: int = 256,
                   max_rows: int = 4096) -> list[float]:
    """The NSR of each genome of ``block`` over ``call`` (as ``block_nsr`` would give one by one)."""
    if not genomes:
        return []
    batch = len(call.args[0]) if call.args else len(next(iter(call.kwargs.values())))
    chunk = max(1, min(chunk, batch))
    group = max(1, max_rows // chunk)
    num = [0.0] * len(genomes)
    den = 0.0
    crops = _WeightCrops()
    for start in range(0, batch, chunk):
        part = call.select(slice(start, start + chunk))
        rows = min(chunk, batch - start)
        targets = output_tensors(part.output)
        den_part = sum(float((t.double() ** 2).sum()) for t in targets)
        den += den_part
        for first in range(0, len(genomes), group):
            members = genomes[first:first + group]
            repeat = len(members)

            def stack(t: torch.Tensor) -> torch.Tensor:
                return t.repeat(repeat, *([1] * (t.dim() - 1)))

            args, kwargs = _map_tensors(part.args, stack), _map_tensors(part.kwargs, stack)
            with _population_mode(block, members, rows, crops) as state:
                out = block(*args, **kwargs)
            for offset in range(repeat):
                mine = _map_tensors(out, lambda t, o=offset: state.part(t, o))
                num[first + offset] += float(noise_to_signal(mine, part.output).double()) * den_part
    return [value / den for value in num]


class PopulationEvaluator:
    """``evaluate(genome) -> (nsr, latency_ms)`` for :func:`pyevo.search.local.search_block`, with a
    ``many(genomes)`` method that scores a generation's genomes together through the population ops.

    Args:
        block: the super-block (its weights are read, never changed; its genome is left as it was).
        call: the block's held-out call (inputs and teacher outputs).
        latency: genome -> measured latency in ms (the run's latency table).
        device: where to evaluate; by default the block's device. The block and the call are copied
            there once when it differs (e.g. NSRs on the GPU for a supernet kept on the CPU).
        chunk, max_rows: samples per chunk (as ``block_nsr``) and rows (candidates x samples) per
            forward.
    """

    def __init__(self, block: SuperBlock, call: BlockCall, latency: Callable[[Genome], float],
                 device: torch.device | str | None = None, chunk: int = 256, max_rows: int = 4096):
        if block.space.transformers:
            raise ValueError(f"{block.space.name}: the population ops have no transformer (cross-attention) "
                             "forward; score this block candidate by candidate (block_evaluator does)")
        here = next(block.parameters()).device
        target = torch.device(device) if device is not None else here
        if target != here:
            import copy

            block = copy.deepcopy(block).to(target)
            call = call.to(target)
        self.block, self.call, self.latency = block, call, latency
        self.chunk, self.max_rows = chunk, max_rows

    def __call__(self, genome: Genome) -> tuple[float, float]:
        """One genome through the per-candidate path."""
        previous = self.block.genome
        self.block.set_genome(genome)
        try:
            nsr = block_nsr(self.block, self.call, self.chunk)
        finally:
            self.block.set_genome(previous)
        return nsr, float(self.latency(genome))

    def many(self, genomes: Sequence[Genome]) -> list[tuple[float, float]]:
        """Every genome at once through the population ops."""
        nsrs = population_nsr(self.block, self.call, list(genomes), self.chunk, self.max_rows)
        return [(nsr, float(self.latency(genome))) for nsr, genome in zip(nsrs, genomes)]


def block_evaluator(block: SuperBlock, call: BlockCall, latency: Callable[[Genome], float],
                    device: torch.device | str) -> Callable[[Genome], tuple[float, float]]:
    """The ``evaluate`` callable of one block's search for a run on ``device``.

    On CUDA: a :class:`PopulationEvaluator` on the GPU (the block and its held-out call are copied
    there once), so each generation's new genomes are scored together through the population
    ops. Elsewhere, and for blocks with transformers: the per-candidate path (``set_genome`` + ``block_nsr``) on the block's own
    device, as before.
    """
    # The population ops cover resnets and self-attention; a block with transformers (cross-attention)
    # is scored candidate by candidate, so each candidate runs at its own genome.
    if torch.device(device).type == "cuda" and not block.space.transformers:
        return PopulationEvaluator(block, call, latency, device=device)

    def evaluate(genome: Genome) -> tuple[float, float]:
        block.set_genome(genome)
        return block_nsr(block, call), float(latency(genome))

    return evaluate
