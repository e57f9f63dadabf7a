"""Mixed precision for the training stages (distillation, retraining) on the run's device.

``train_dtype`` is the autocast dtype: ``auto`` means bfloat16 on CUDA and float32 on the CPU.
float16 needs loss scaling (a ``GradScaler``); bfloat16 and float32 do not. Weights and optimiser
state stay float32 whatever the autocast dtype. The latency stage has its own deployment dtype.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import shutil
from pathlib import Path

import torch

from pyevo.distributed import SINGLE, Context, PeerFailed, quiet
from pyevo.runfolder import atomic_write_bytes, atomic_write_json, file_digest

log = logging.getLogger(__name__)

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


class StepCheckpoints:
    """Checkpoints of a training loop inside its stage, so a killed run resumes from the last one.

    Every ``every`` steps (0: never) the loop's whole state (weights, optimiser, learning-rate
    schedule, loss scaler, every random state it draws from, the history so far) is written to
    ``folder/step_<steps done>.pt`` (``torch.save``, read back with ``weights_only``), then a manifest
    ``step_<steps done>.json`` holding the stage's key, the file's size and its sha256; both are
    written atomically (:mod:`pyevo.runfolder`), the manifest last, and the two newest checkpoints are
    kept. On resume the newest checkpoint whose manifest matches the stage's key and whose file matches
    its digest is loaded; a damaged one is passed over with a log line (the one before it, or a start
    from scratch, instead). The stage removes the folder once its result is written (:meth:`clear`).

    Under torchrun (``context``) rank 0 alone writes, and every rank loads the checkpoint rank 0 chose.
    """

    def __init__(self, folder: str | Path, key: str, every: int, context: Context = SINGLE, keep: int = 2):
        self.folder, self.key, self.every, self.keep, self.context = Path(folder), key, int(every), keep, context

    def due(self, done: int, steps: int) -> bool:
        """Whether to checkpoint after ``done`` of ``steps`` steps (never after the last one: the stage's
        result follows it)."""
        return self.every > 0 and done < steps and done % self.every == 0

    def save(self, done: int, state) -> None:
        """Rank 0 writes ``state()`` (a dict of tensors, numbers, lists, tuples) as the checkpoint after
        ``done`` steps; every rank returns once it is written, or raises rank 0's error. (Collectives, not
        the heartbeat wait of :meth:`Context.agree`: a rank that hangs ends the job after the timeout.)"""
        failure = None
        if self.context.is_main:
            try:
                self._write(done, state())
            except Exception as error:  # noqa: BLE001 - told to the other ranks, then raised
                failure = error
        if self.context.active:
            outcome = self.context.broadcast_object(None if failure is None else (type(failure).__name__,
                                                                                   str(failure)))
            if failure is None and outcome is not None:
                raise quiet(PeerFailed(0, *outcome))
        if failure is not None:
            raise failure

    def _write(self, done: int, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        name = f"step_{done:08d}"
        atomic_write_bytes(self.folder / f"{name}.pt", data)
        atomic_write_json(self.folder / f"{name}.json", {"key": self.key, "step": done, "bytes": len(data),
                                                          "sha256": hashlib.sha256(data).hexdigest()})
        for manifest in self._manifests()[self.keep:]:
            for path in (manifest, manifest.with_suffix(".pt")):
                path.unlink(missing_ok=True)
        log.info("checkpoint after step %d written to %s", done, self.folder / f"{name}.pt")

    def load(self) -> dict | None:
        """The newest good checkpoint's state (on every rank: rank 0's), or None."""
        return self.context.broadcast_object(self._read() if self.context.is_main else None)

    def _read(self) -> dict | None:
        for manifest in self._manifests():
            data = manifest.with_suffix(".pt")
            try:
                entry = json.loads(manifest.read_text())
                if not isinstance(entry, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as error:
                log.warning("checkpoint %s is damaged (%s); ignored", manifest, error)
                continue
            if entry.get("key") != self.key:
                log.info("checkpoint %s belongs to another configuration of the stage; ignored", manifest)
                continue
            if not data.is_file() or data.stat().st_size != entry.get("bytes") or file_digest(data) != entry.get(
                    "sha256"):
                log.warning("checkpoint %s is missing or damaged (its size or sha256 differs from %s); ignored",
                            data, manifest.name)
                continue
            try:
                state = torch.load(data, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - a file that matches its digest but will not load
                log.warning("checkpoint %s cannot be read (%s); ignored", data, error)
                continue
            log.info("resuming from the checkpoint after step %d (%s)", entry.get("step"), data)
            return state
        if self.folder.is_dir() and any(self.folder.iterdir()):
            log.warning("no usable checkpoint in %s: the stage starts from scratch", self.folder)
        return None

    def clear(self) -> None:
        """Remove the checkpoints (rank 0, once the stage's result is written)."""
        if self.context.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _manifests(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("step_*.json"), reverse=True)


def random_states(device: torch.device | str) -> dict:
    """The global random states a training loop may draw from: torch's CPU generator, and the
    device's (CUDA) generator where it runs on one."""
    states = {"torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return states


def set_random_states(states: dict, device: torch.device | str) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], torch.device(device))
