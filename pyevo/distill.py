"""Block-wise distillation of the supernet.

Every super-block is fed the teacher's input to that block (teacher forcing) and learns the
teacher's output of it. One teacher forward per batch feeds all blocks. Paths per step follow the
sandwich rule: the largest, the smallest and some random genomes of each block. Training minimises
the MSE; blocks are ranked by the scale-free NSR = ||S - T||^2 / ||T||^2.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pyevo.config import DistillConfig
from pyevo.teacher import BlockCall, noise_to_signal, output_tensors, record_blocks

log = logging.getLogger(__name__)


def noisy_batch(images: torch.Tensor, scheduler, batch_size: int, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of training inputs: images noised at timesteps drawn uniformly over the schedule."""
    index = torch.randint(len(images), (batch_size,), generator=generator)
    clean = images[index]
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    return scheduler.add_noise(clean, noise, timesteps), timesteps, noise


def heldout_calls(teacher: nn.Module, images: torch.Tensor, scheduler, size: int, seed: int,
                  chunk: int = 256) -> dict[str, BlockCall]:
    """The fixed held-out set every candidate is scored on: the same images, timesteps and noise
    for every candidate (a paired comparison), recorded at each block of the teacher."""
    generator = torch.Generator().manual_seed(seed)
    clean = images[:size]
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    parts = [record_blocks(teacher, noisy[i:i + chunk], timesteps[i:i + chunk])[0]
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
    pairs = list(zip(output_tensors(output), output_tensors(target)))
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


def distill_supernet(teacher: nn.Module, supernet: Mapping[str, nn.Module], spaces: Mapping, images: torch.Tensor,
                     scheduler, config: DistillConfig, seed: int, progress: bool = True) -> DistillResult:
    """Train every super-block on the teacher's block inputs/outputs, all in one pass per batch."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for block in supernet.values() for p in block.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.steps, 1))
    for block in supernet.values():
        block.train()
    history = []
    bar = tqdm(range(config.steps), desc="distill", disable=not progress)
    for step in bar:
        noisy, timesteps, _ = noisy_batch(images, scheduler, config.batch_size, generator)
        calls, _ = record_blocks(teacher, noisy, timesteps)
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step}
        for name, block in supernet.items():
            space = spaces[name]
            paths = [space.largest_genome(), space.smallest_genome()]
            paths += [space.random_genome(rng) for _ in range(config.random_paths)]
            total = 0.0
            for genome in paths:
                block.set_genome(genome)
                loss = block_mse(block(*calls[name].args, **calls[name].kwargs), calls[name].output)
                # One backward per path keeps only one path's graph alive at a time. A path that
                # skips every layer of a block without a sampler is the identity: nothing to train.
                if loss.requires_grad:
                    (loss / len(paths)).backward()
                total += float(loss.detach())
            record[name] = total / len(paths)
        optimizer.step()
        schedule.step()
        history.append(record)
        bar.set_postfix(mse=f"{sum(v for k, v in record.items() if k != 'step') / len(supernet):.4f}")
    for block in supernet.values():
        block.eval()
    return DistillResult(history)
