"""Retraining of the assembled student with the dynamic joint loss.

    L(s) = lambda(s) * mean_b NSR_b + (1 - lambda(s)) * L_end

NSR_b compares the student's block b, fed the teacher's input to that block, with the teacher's
output of it; L_end is the MSE of the student's prediction against the true target of the
teacher's prediction type (the noise for epsilon, the velocity for v_prediction, the clean image
for sample: the paper's epsilon-loss), or against the teacher's own prediction (``end_target:
teacher``, output distillation; what data-free mode can lean on). The arms:

- ``dynamic``: lambda decays 1 -> 0 along a cosine over the first ``lambda_share`` of the steps;
- ``static``: lambda fixed at ``static_lambda``;
- ``hard``: lambda = 1 for the first ``lambda_share`` of the steps, then 0;
- ``end-only``: lambda = 0.

The weights kept are an exponential moving average of the trained ones. Training runs on the
student's device (the teacher must be there too) under the run's autocast dtype; with
``checkpointing`` the student recomputes its blocks' activations in the backward (diffusers'
gradient checkpointing).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from pyevo.config import RetrainConfig
from pyevo.diffusion import ImageSet, noisy_batch
from pyevo.space import searchable_blocks
from pyevo.teacher import at_least_float32, conditioning, model_device, noise_to_signal, record_blocks
from pyevo.training import MixedPrecision, check_finite, check_teacher_finite

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


def retrain_student(teacher: nn.Module, student: nn.Module, data: ImageSet, scheduler,
                    config: RetrainConfig, seed: int, progress: bool = True,
                    train_dtype: torch.dtype = torch.float32) -> list[dict[str, float]]:
    """Train ``student`` in place; on return it holds the EMA weights. Returns the loss history."""
    generator = torch.Generator().manual_seed(seed)
    device = model_device(student)
    precision = MixedPrecision(str(device), train_dtype)
    if config.checkpointing:
        student.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.steps, 1))
    ema = EMAModel(student.parameters(), decay=config.ema_decay)
    student_blocks = searchable_blocks(student)
    student.train()
    history = []
    for step in tqdm(range(config.steps), desc="retrain", disable=not progress):
        batch = noisy_batch(data, scheduler, config.batch_size, generator, device)
        weight = block_weight(step, config.steps, config)
        # The teacher runs only when a term needs it (block targets, or its prediction as the target).
        to_teacher = config.end_target == "teacher"
        with precision.autocast():
            calls, teacher_prediction = (record_blocks(teacher, batch.noisy, batch.timesteps, batch.labels,
                                                       batch.encoder_hidden_states)
                                         if weight > 0 or to_teacher else ({}, None))
            if teacher_prediction is not None:
                check_teacher_finite(teacher_prediction, batch.timesteps, "retrain", step)
            target = teacher_prediction if to_teacher else batch.target
            prediction = student(batch.noisy, batch.timesteps,
                                 **conditioning(student, batch.labels, batch.encoder_hidden_states)).sample
            end_loss = F.mse_loss(at_least_float32(prediction), at_least_float32(target))
            loss = (1.0 - weight) * end_loss
            record = {"step": step, "lambda": weight, "end_loss": float(end_loss.detach())}
            if weight > 0:
                nsr = [noise_to_signal(block(*calls[name].args, **calls[name].kwargs), calls[name].output)
                       for name, block in student_blocks.items()]
                block_loss = torch.stack(nsr).mean()
                loss = loss + weight * block_loss
                record["block_nsr"] = float(block_loss.detach())
        check_finite(float(loss.detach()), f"retrain step {step} (timesteps {int(batch.timesteps.min())}-"
                     f"{int(batch.timesteps.max())}): the loss", "lower retrain.lr (or use --train-dtype float32) "
                     "and run again with --resume; finished stages are kept")
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
        schedule.step()
        ema.step(student.parameters())
        record["loss"] = float(loss.detach())
        history.append(record)
    ema.copy_to(student.parameters())
    if config.checkpointing:
        student.disable_gradient_checkpointing()
    student.eval()
    return history
