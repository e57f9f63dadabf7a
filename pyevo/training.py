"""Mixed precision for the training stages (distillation, retraining) on the run's device.

``train_dtype`` is the autocast dtype: ``auto`` means bfloat16 on CUDA and float32 on the CPU.
float16 needs loss scaling (a ``GradScaler``); bfloat16 and float32 do not. Weights and optimiser
state stay float32 whatever the autocast dtype. The latency stage has its own deployment dtype.
"""
from __future__ import annotations

import contextlib
import math

import torch

TRAIN_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_train_dtype(name: str, device: str) -> torch.dtype:
    if name not in TRAIN_DTYPES:
        raise ValueError(f"train dtype must be one of {', '.join(TRAIN_DTYPES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


class MixedPrecision:
    """Autocast, and loss scaling where the dtype needs it, for one training loop."""

    def __init__(self, device: str, dtype: torch.dtype):
        self.device_type = torch.device(device).type
        self.dtype = dtype
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)
        self.scaler.update()


class NonFiniteError(RuntimeError):
    """A loss, NSR, output or sample became NaN or infinite; the message says where and what to do."""


def check_finite(value: float, what: str, advice: str) -> float:
    """``value``, or a :class:`NonFiniteError` naming ``what`` (stage, block, step, timesteps) and ``advice``."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} is {value}: {advice}")
    return value


def check_teacher_finite(prediction: torch.Tensor, timesteps: torch.Tensor, stage: str, step: int) -> None:
    """The teacher's own prediction is finite: a non-finite target is the teacher's fault, not training's."""
    bad = ~torch.isfinite(prediction.flatten(1)).all(dim=1)
    if bool(bad.any()):
        raise teacher_nonfinite_error([int(t) for t in timesteps[bad].tolist()], stage, step)


def teacher_nonfinite_error(timesteps: list[int], stage: str, step: int) -> NonFiniteError:
    """The error of :func:`check_teacher_finite` for the (global) batch rows at ``timesteps``."""
    steps = sorted(set(timesteps))
    return NonFiniteError(f"{stage} step {step}: the teacher's own prediction is not finite at timestep(s) "
                          f"{', '.join(map(str, steps[:8]))}: the teacher cannot take these timesteps "
                          "(check its time embedding and schedule)")
