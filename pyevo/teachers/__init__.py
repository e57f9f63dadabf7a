"""Built-in teachers: small diffusers UNets trained by pyevo and shipped inside the package.

The digits teacher is a 16x16 grayscale ``UNet2DModel`` trained on the digits training split by
``python -m pyevo.teachers.digits``; it lives in ``DIGITS_TEACHER_DIR`` as a ``DDPMPipeline`` folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel

DIGITS_TEACHER_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits_teacher"


def load_digits_teacher(folder: str | os.PathLike = DIGITS_TEACHER_DIR) -> tuple[UNet2DModel, DDPMScheduler]:
    """The shipped digits teacher (eval mode, float32, CPU) and the DDPM scheduler it was trained with.

    Loads from a local folder only; no network access. Raises ``FileNotFoundError`` when the
    folder does not hold a ``unet/`` and a ``scheduler/`` subfolder.
    """
    folder = Path(folder)
    for sub in ("unet", "scheduler"):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"{folder} is not a digits teacher folder: no {sub}/ in it")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", local_files_only=True, low_cpu_mem_usage=False)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    unet.eval().requires_grad_(False)
    return unet, scheduler
