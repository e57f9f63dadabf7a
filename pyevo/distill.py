"""Block-wise distillation of the supernet.

Every super-block is fed the teacher's input to that block (teacher forcing) and learns the
teacher's output of it. One teacher forward per batch feeds all blocks. Paths per step follow the
sandwich rule: the largest, the smallest and some random genomes of each block (and, with
``teacher_path``, the teacher-shaped one). Training minimises
the MSE; blocks are ranked by the scale-free NSR = ||S - T||^2 / ||T||^2.

Everything runs where the supernet's weights are (the run's device), under the run's autocast
dtype; the teacher runs under ``no_grad``. With ``checkpointing`` each block path's activations
are recomputed in the backward instead of kept, for teachers whose blocks do not fit otherwise.

Under torchrun (``context``) each rank trains on its shard of every global batch and the gradients
are averaged over ranks once per step; the losses are means over equal shards, so this is the
full batch's gradient (pyevo/distributed.py).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from pyevo.config import DistillConfig
from pyevo.diffusion import ImageSet, noisy_batch, select_rows
from pyevo.distributed import SINGLE, Context
from pyevo.teacher import (BlockCall, at_least_float32, model_device, noise_to_signal, output_tensors,
                           record_blocks)
from pyevo.training import MixedPrecision, StepCheckpoints, check_finite, random_states, set_random_states

log = logging.getLogger(__name__)


def heldout_calls(teacher: nn.Module, data: ImageSet, scheduler, size: int, seed: int,
                  chunk: int = 256) -> dict[str, BlockCall]:
    """The fixed held-out set every candidate is scored on: the same images, conditions (labels or
    text states), timesteps and noise for every candidate (a paired comparison), recorded at each
    block of the teacher, on the teacher's device (noise drawn on the CPU, so every device scores the
    same set)."""
    generator = torch.Generator().manual_seed(seed)
    device = model_device(teacher)
    held = data.subset(slice(0, size))
    clean = held.images
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
    noisy = scheduler.add_noise(clean, noise, timesteps).to(device)
    timesteps = timesteps.to(device)
    labels = None if held.labels is None else held.labels.to(device)
    states = None if held.encoder_hidden_states is None else held.encoder_hidden_states.to(device)
    parts = [record_blocks(teacher, noisy[i:i + chunk], timesteps[i:i + chunk],
                           None if labels is None else labels[i:i + chunk],
                           None if states is None else states[i:i + chunk],
                           select_rows(held.added_cond_kwargs, slice(i, i + chunk), device))[0]
             for i in range(0, len(noisy), chunk)]
    return {name: _concat_calls([part[name] for part in parts]) for name in parts[0]}


def _concat_calls(calls: Sequence[BlockCall]) -> BlockCall:
    if len(calls) == 1:
        return calls[0]

    def cat(values):
        first = values[0]
        if isinstance(first, torch.Tensor):
            return torch.cat(values)
        if isinstance(first, (tuple, list)):
            return type(first)(cat([v[i] for v in values]) for i in range(len(first)))
        if isinstance(first, dict):
            return {k: cat([v[k] for v in values]) for k in first}
        return first

    return BlockCall(cat([c.args for c in calls]), cat([c.kwargs for c in calls]), cat([c.output for c in calls]))


def block_mse(output, target) -> torch.Tensor:
    # At least float32: under bfloat16 autocast the outputs are bfloat16, too coarse to sum a loss in.
    pairs = [(at_least_float32(s), at_least_float32(t)) for s, t in zip(output_tensors(output), output_tensors(target))]
    return sum(F.mse_loss(s, t, reduction="sum") for s, t in pairs) / sum(t.numel() for _, t in pairs)


@torch.no_grad()
def block_nsr(block: nn.Module, call: BlockCall, chunk: int = 256) -> float:
    """NSR of ``block`` (with its current genome) over a recorded call, in chunks."""
    batch = len(call.args[0]) if call.args else len(next(iter(call.kwargs.values())))
    num = den = 0.0
    for start in range(0, batch, chunk):
        part = call.select(slice(start, start + chunk))
        out = block(*part.args, **part.kwargs)
        targets = output_tensors(part.output)
        den_part = sum(float((t.double() ** 2).sum()) for t in targets)
        num += float(noise_to_signal(out, part.output).double()) * den_part
        den += den_part
    return num / den


@dataclass
class DistillResult:
    history: list[dict[str, float]]  # per step: mean MSE of each block over its sandwich paths


def distill_supernet(teacher: nn.Module, supernet: Mapping[str, nn.Module], spaces: Mapping, data: ImageSet,
                     scheduler, config: DistillConfig, seed: int, progress: bool = True,
                     train_dtype: torch.dtype = torch.float32, context: Context = SINGLE,
                     checkpoints: StepCheckpoints | None = None) -> DistillResult:
    """Train every super-block on the teacher's block inputs/outputs, all in one pass per batch.

    Runs on the teacher's device (the supernet must be there too), autocast to ``train_dtype``;
    under torchrun (``context``) on this rank's shard of each batch, data parallel. With
    ``checkpoints`` the loop starts from the last good checkpoint there (weights, optimiser, schedule,
    loss scaler, the path and data random states, the history) and writes one every
    ``checkpoints.every`` steps: a resumed loop ends as an uninterrupted one.
    """
    rng = random.Random(seed)
    device = model_device(teacher)
    precision = MixedPrecision(str(device), train_dtype)
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for block in supernet.values() for p in block.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.steps, 1))
    for block in supernet.values():
        block.train()
    history = []
    start = 0
    state = None if checkpoints is None else checkpoints.load()
    if state is not None:
        for name, block in supernet.items():
            block.load_state_dict(state["supernet"][name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        precision.scaler.load_state_dict(state["scaler"])
        rng.setstate(state["paths"])
        generator.set_state(state["data"])
        set_random_states(state["random"], device)
        history, start = state["history"], state["step"]

    def checkpoint(done: int) -> dict:
        return {"step": done, "supernet": {name: block.state_dict() for name, block in supernet.items()},
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": precision.scaler.state_dict(), "paths": rng.getstate(), "data": generator.get_state(),
                "random": random_states(device), "history": history}

    bar = tqdm(range(start, config.steps), desc="distill", disable=not progress, initial=start, total=config.steps)
    for step in bar:
        batch = noisy_batch(data, scheduler, config.batch_size, generator, device, context.shard)
        with precision.autocast():
            calls, teacher_prediction = record_blocks(teacher, batch.noisy, batch.timesteps, batch.labels,
                                                      batch.encoder_hidden_states, batch.added_cond_kwargs)
        context.check_teacher_finite(teacher_prediction, batch.timesteps, "distill", step)
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step}
        shard_losses: list[tuple[str, str, int, torch.Tensor]] = []  # under torchrun: checked globally below
        for name, block in supernet.items():
            space = spaces[name]
            paths = [space.largest_genome(), space.smallest_genome()]
            if config.teacher_path:
                paths.append(space.teacher_genome())
            paths += [space.random_genome(rng) for _ in range(config.random_paths)]
            total = 0.0
            for genome in paths:
                block.set_genome(genome)
                with precision.autocast():
                    output = _forward(block, calls[name], config.checkpointing)
                    loss = block_mse(output, calls[name].output)
                # One backward per path keeps only one path's graph alive at a time. A path that
                # skips every layer of a block without a sampler is the identity: nothing to train.
                if context.active:
                    shard_losses.append((name, space.encode(genome), len(paths), loss.detach()))
                else:
                    total += _checked(float(loss.detach()), step, name, space.encode(genome))
                if loss.requires_grad:
                    precision.backward(loss / len(paths))
            if not context.active:
                record[name] = total / len(paths)
        if context.active:
            # The global loss of each path (the mean of the ranks' equal shards), checked on every rank
            # alike before any rank steps; then the full batch's gradient.
            values = context.mean(torch.stack([loss.double().cpu() for *_, loss in shard_losses]))
            for (name, code, count, _), value in zip(shard_losses, values):
                record[name] = record.get(name, 0.0) + _context_checked(context, value, step, name, code) / count
            context.average_gradients(parameters)
        precision.step(optimizer)
        schedule.step()
        history.append(record)
        bar.set_postfix(mse=f"{sum(v for k, v in record.items() if k != 'step') / len(supernet):.4f}")
        if checkpoints is not None and checkpoints.due(step + 1, config.steps):
            checkpoints.save(step + 1, lambda done=step + 1: checkpoint(done))
    for block in supernet.values():
        block.eval()
    return DistillResult(history)


def _checked(value: float, step: int, name: str, code: str) -> float:
    return check_finite(value, f"distill step {step}, block {name}, path {code}: the block loss", "lower "
                        "distill.lr (or use --train-dtype float32) and run again; finished stages are kept")


def _context_checked(context: Context, value: float, step: int, name: str, code: str) -> float:
    """:func:`_checked` of a global value: every rank raises alike, rank 0 prints."""
    try:
        return _checked(value, step, name, code)
    except Exception as error:
        raise context.shared(error) from None


def _forward(block: nn.Module, call: BlockCall, checkpointing: bool):
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *call.args, use_reentrant=False, **call.kwargs)
    return block(*call.args, **call.kwargs)
