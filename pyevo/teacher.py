"""The teacher stage: load a diffusers UNet from a local folder and record what its blocks see.

The searchable blocks are ``down_blocks[i]``, ``mid_block`` and ``up_blocks[i]``; the stem and the
head (conv_in, time embedding, conv_norm_out, conv_out) stay the teacher's.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from pyevo.space import searchable_blocks

log = logging.getLogger(__name__)


class TeacherError(ValueError):
    """The teacher a user named cannot be used (missing folder, unsupported model)."""


SUPPORTED_UNETS = ("UNet2DModel",)


def load_teacher(spec: str) -> tuple[UNet2DModel, DDPMScheduler]:
    """``"digits"`` (the built-in teacher) or a local folder.

    The folder may be a diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``)
    or a model folder (``config.json`` + weights); the scheduler is read from ``scheduler/`` when
    there is one, else the diffusers DDPM default (1,000 linear steps).
    """
    if spec == "digits":
        from pyevo.teachers import load_digits_teacher

        return load_digits_teacher()
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise TeacherError(f"teacher folder not found: {folder}")
    unet_folder = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config_file = unet_folder / "config.json"
    if not config_file.is_file():
        raise TeacherError(f"{folder} is not a diffusers UNet folder (no config.json or unet/config.json)")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except json.JSONDecodeError as error:
        raise TeacherError(f"{config_file} is not valid JSON ({error.msg})") from None
    if class_name not in SUPPORTED_UNETS:
        raise TeacherError(f"{unet_folder} holds a {class_name}; pyevo supports {', '.join(SUPPORTED_UNETS)}")
    try:
        unet = UNet2DModel.from_pretrained(unet_folder, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise TeacherError(f"cannot load the UNet in {unet_folder}: {str(error).splitlines()[0]}") from None
    scheduler_folder = folder / "scheduler"
    if (scheduler_folder / "scheduler_config.json").is_file():
        scheduler = DDPMScheduler.from_pretrained(scheduler_folder)
    else:
        log.info("no scheduler/ beside the teacher: using the DDPM default schedule")
        scheduler = DDPMScheduler()
    return unet.eval(), scheduler


@dataclass
class BlockCall:
    """One recorded call of a block: its inputs and its output (detached)."""

    args: tuple
    kwargs: dict[str, Any]
    output: Any

    def select(self, index: torch.Tensor | slice) -> "BlockCall":
        """The same call restricted to some batch rows (every tensor sliced along dim 0)."""
        return BlockCall(_map_tensors(self.args, lambda t: t[index]),
                         _map_tensors(self.kwargs, lambda t: t[index]),
                         _map_tensors(self.output, lambda t: t[index]))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "BlockCall":
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return BlockCall(_map_tensors(self.args, move), _map_tensors(self.kwargs, move),
                         _map_tensors(self.output, move))


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def output_tensors(output: Any) -> list[torch.Tensor]:
    """A block's output as a flat list of tensors (down blocks return (hidden, (res, ...)))."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    if hasattr(output, "to_tuple"):
        return output_tensors(output.to_tuple())
    return []


def _detached(tensor: torch.Tensor) -> torch.Tensor:
    # Contiguous as well: oneDNN convolutions may return channels-last tensors, and torch 2.13's
    # CPU GroupNorm backward crashes (segfault) on a channels-last input that needs no gradient,
    # which is exactly what a recorded block input is.
    return tensor.detach().contiguous()


def record_blocks(unet: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor
                  ) -> tuple[dict[str, BlockCall], torch.Tensor]:
    """Run the teacher once; return every searchable block's inputs and output, and its prediction."""
    calls: dict[str, BlockCall] = {}
    pending: dict[str, tuple] = {}
    handles = []
    for name, block in searchable_blocks(unet).items():
        def before(module, args, kwargs, name=name):
            pending[name] = (_map_tensors(args, _detached), _map_tensors(kwargs, _detached))

        def after(module, args, kwargs, output, name=name):
            block_args, block_kwargs = pending.pop(name)
            calls[name] = BlockCall(block_args, block_kwargs, _map_tensors(output, _detached))

        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    try:
        with torch.no_grad():
            prediction = unet(sample, timesteps).sample
    finally:
        for handle in handles:
            handle.remove()
    return calls, prediction


def noise_to_signal(student_output: Any, teacher_output: Any) -> torch.Tensor:
    """NSR = ||S - T||^2 / ||T||^2 over all the block's output tensors (scale-free)."""
    num = sum(((s - t) ** 2).sum() for s, t in zip(output_tensors(student_output), output_tensors(teacher_output)))
    den = sum((t ** 2).sum() for t in output_tensors(teacher_output))
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)
