"""Retraining of the assembled student with the dynamic joint loss.

    L(s) = lambda(s) * mean_b NSR_b + (1 - lambda(s)) * L_end

NSR_b compares the student's block b, fed the teacher's input to that block, with the teacher's
output of it; L_end is the MSE of the student's prediction against the true target of the
teacher's prediction type (the noise for epsilon, the velocity for v_prediction, the clean image
for sample: the paper's epsilon-loss), or against the teacher's own prediction (``end_target:
teacher``, output distillation; what data-free mode can lean on), each sample's error weighted
by Min-SNR-gamma where ``snr_gamma`` > 0 (:func:`end_loss_weights`). The arms:

- ``dynamic``: lambda decays 1 -> 0 along a cosine over the first ``lambda_share`` of the steps;
- ``static``: lambda fixed at ``static_lambda``;
- ``hard``: lambda = 1 for the first ``lambda_share`` of the steps, then 0;
- ``end-only``: lambda = 0.

The weights kept are an exponential moving average of the trained ones. Training runs on the
student's device (the teacher must be there too) under the run's autocast dtype; with
``checkpointing`` the student recomputes its blocks' activations in the backward (diffusers'
gradient checkpointing).

Under torchrun (``context``) the student trains under DistributedDataParallel, each rank on its shard
of every global batch. L_end is a mean over equal shards, so DDP's gradient mean is the full batch's;
NSR_b is a ratio of sums over the whole batch, so each rank's share is its numerator over the
all-reduced denominator, scaled by the world size (:meth:`pyevo.distributed.Context.nsr`): the DDP
mean of the ranks' gradients is then the gradient of the full batch's loss.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel, compute_snr
from torch import nn
from tqdm.auto import tqdm

from pyevo.config import RetrainConfig
from pyevo.diffusion import ImageSet, noisy_batch
from pyevo.distributed import SINGLE, Context
from pyevo.space import searchable_blocks
from pyevo.teacher import (at_least_float32, conditioning, model_device, noise_to_signal, output_tensors,
                           record_blocks)
from pyevo.training import MixedPrecision, StepCheckpoints, check_finite, random_states, set_random_states

log = logging.getLogger(__name__)


def block_weight(step: int, steps: int, config: RetrainConfig) -> float:
    """lambda(step): the weight of the block-wise term at ``step`` of ``steps``."""
    decay_steps = max(1, round(config.lambda_share * steps))
    if config.loss == "end-only":
        return 0.0
    if config.loss == "static":
        return config.static_lambda
    if config.loss == "hard":
        return 1.0 if step < decay_steps else 0.0
    if step >= decay_steps:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))


def end_loss_weights(scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor | None:
    """Per-sample Min-SNR-gamma weights of L_end at ``timesteps`` (None when ``snr_gamma`` is 0), for the
    teacher's prediction type: min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v_prediction), min(SNR, gamma)
    (sample)."""
    if snr_gamma <= 0:
        return None
    snr = compute_snr(scheduler, timesteps.cpu()).double()
    clipped = snr.clamp(max=snr_gamma)
    kind = scheduler.config.prediction_type
    weights = clipped / snr if kind == "epsilon" else clipped / (snr + 1) if kind == "v_prediction" else clipped
    return weights.float().to(timesteps.device)


def retrain_student(teacher: nn.Module, student: nn.Module, data: ImageSet, scheduler,
                    config: RetrainConfig, seed: int, progress: bool = True,
                    train_dtype: torch.dtype = torch.float32, context: Context = SINGLE,
                    checkpoints: StepCheckpoints | None = None) -> list[dict[str, float]]:
    """Train ``student`` in place; on return it holds the EMA weights. Returns the loss history
    (under torchrun the full batch's figures, the same on every rank).

    With ``checkpoints`` the loop starts from the last good checkpoint there (student, EMA, optimiser,
    schedule, loss scaler, the data random state, the history) and writes one every
    ``checkpoints.every`` steps: a resumed loop ends as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed)
    device = model_device(student)
    precision = MixedPrecision(str(device), train_dtype)
    if config.checkpointing:
        student.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.steps, 1))
    ema = EMAModel(student.parameters(), decay=config.ema_decay)
    history = []
    start = 0
    state = None if checkpoints is None else checkpoints.load()
    if state is not None:  # before DDP wraps the student (DDP starts from rank 0's weights: these)
        student.load_state_dict(state["student"])
        ema.load_state_dict(state["ema"])
        ema.to(device)  # read back on the CPU
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        precision.scaler.load_state_dict(state["scaler"])
        generator.set_state(state["data"])
        set_random_states(state["random"], device)
        history, start = state["history"], state["step"]

    def checkpoint(done: int) -> dict:
        return {"step": done, "student": student.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": precision.scaler.state_dict(), "data": generator.get_state(),
                "random": random_states(device), "history": history}

    student_blocks = searchable_blocks(student)
    # Min-SNR weights of every training timestep, once, on the device: a step indexes them (no host sync).
    timestep_weights = end_loss_weights(scheduler, torch.arange(scheduler.config.num_train_timesteps, device=device),
                                        config.snr_gamma)
    model = context.data_parallel(student)  # the student itself in one process
    student.train()
    for step in tqdm(range(start, config.steps), desc="retrain", disable=not progress, initial=start,
                     total=config.steps):
        batch = noisy_batch(data, scheduler, config.batch_size, generator, device, context.shard)
        weight = block_weight(step, config.steps, config)
        # The teacher runs only when a term needs it (block targets, or its prediction as the target).
        to_teacher = config.end_target == "teacher"
        with precision.autocast():
            calls, teacher_prediction = (record_blocks(teacher, batch.noisy, batch.timesteps, batch.labels,
                                                       batch.encoder_hidden_states, batch.added_cond_kwargs)
                                         if weight > 0 or to_teacher else ({}, None))
            if teacher_prediction is not None:
                context.check_teacher_finite(teacher_prediction, batch.timesteps, "retrain", step)
            target = teacher_prediction if to_teacher else batch.target
            prediction = model(batch.noisy, batch.timesteps,
                               **conditioning(student, batch.labels, batch.encoder_hidden_states,
                                              batch.added_cond_kwargs)).sample
            # A mean over samples (weighted or not): under torchrun the mean of equal shards is the batch's.
            squared = (at_least_float32(prediction) - at_least_float32(target)) ** 2
            weights = None if timestep_weights is None else timestep_weights[batch.timesteps]
            end_loss = squared.mean() if weights is None else (squared.flatten(1).mean(1) * weights).mean()
            loss = (1.0 - weight) * end_loss
            if not context.active:
                record = {"step": step, "lambda": weight, "end_loss": float(end_loss.detach())}
                if weight > 0:
                    nsr = [noise_to_signal(block(*calls[name].args, **calls[name].kwargs), calls[name].output)
                           for name, block in student_blocks.items()]
                    block_loss = torch.stack(nsr).mean()
                    loss = loss + weight * block_loss
                    record["block_nsr"] = float(block_loss.detach())
                value, low, high = float(loss.detach()), int(batch.timesteps.min()), int(batch.timesteps.max())
            else:
                loss, record, value, low, high = _shard_loss(context, loss, end_loss, weight, step, calls,
                                                             student_blocks, batch.timesteps)
        try:
            check_finite(value, f"retrain step {step} (timesteps {low}-{high}): the loss", "lower retrain.lr (or use "
                         "--train-dtype float32) and run again with --resume; finished stages are kept")
        except Exception as error:
            raise context.shared(error) from None
        optimizer.zero_grad(set_to_none=True)
        with context.collective("retrain's backward (DDP's gradient all-reduce)"):
            precision.backward(loss)
        precision.step(optimizer)
        schedule.step()
        ema.step(student.parameters())
        record["loss"] = value
        history.append(record)
        if checkpoints is not None and checkpoints.due(step + 1, config.steps):
            checkpoints.save(step + 1, lambda done=step + 1: checkpoint(done))
    ema.copy_to(student.parameters())
    if config.checkpointing:
        student.disable_gradient_checkpointing()
    student.eval()
    return history


def _nsr_parts(student_output, teacher_output) -> tuple[torch.Tensor, torch.Tensor]:
    """The numerator and denominator of :func:`pyevo.teacher.noise_to_signal` (sums of squares)."""
    pairs = [(at_least_float32(s), at_least_float32(t))
             for s, t in zip(output_tensors(student_output), output_tensors(teacher_output))]
    return sum(((s - t) ** 2).sum() for s, t in pairs), sum((t ** 2).sum() for _, t in pairs).detach()


def _shard_loss(context: Context, loss: torch.Tensor, end_loss: torch.Tensor, weight: float, step: int, calls,
                student_blocks, timesteps: torch.Tensor):
    """This rank's loss (whose DDP mean over ranks has the full batch's gradient), the step's record,
    the full batch's loss and the global batch's timestep range, the same on every rank."""
    shares, nsrs = [], []
    if weight > 0:
        shares, nsrs = context.nsr([_nsr_parts(block(*calls[name].args, **calls[name].kwargs), calls[name].output)
                                    for name, block in student_blocks.items()])
        loss = loss + weight * torch.stack(shares).mean()
    end = context.mean(end_loss.detach().reshape(1))[0]  # equal shards: the mean is the full batch's
    record = {"step": step, "lambda": weight, "end_loss": end}
    value = (1.0 - weight) * end
    if weight > 0:
        record["block_nsr"] = sum(nsrs) / len(nsrs)
        value += weight * record["block_nsr"]
    low, high = int(timesteps.min()), int(timesteps.max())
    if not math.isfinite(value):  # every rank alike: the message names the global batch's timesteps
        extremes = context.all_gather_object((low, high))
        low, high = min(e[0] for e in extremes), max(e[1] for e in extremes)
    return loss, record, value, low, high
