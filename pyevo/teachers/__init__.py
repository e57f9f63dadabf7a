"""Built-in teachers: small diffusers UNets trained by pyevo and shipped inside the package.

The digits teacher is a 16x16 grayscale ``UNet2DModel`` trained on the digits training split by
``python -m pyevo.teachers.digits``; it lives in ``DIGITS_TEACHER_DIR`` as a ``DDPMPipeline`` folder
and loads, like every teacher, through ``pyevo.teacher.load_teacher("digits")``.

The latent-digits teacher is a small latent diffusion model on 32x32 digits (an ``AutoencoderKL``
to 4x8x8 latents and a latent ``UNet2DModel``) trained by ``python -m pyevo.teachers.latent_digits``;
it lives in ``LATENT_DIGITS_TEACHER_DIR`` as an ``LDMPipeline`` folder (``unet/``, ``vqvae/``,
``scheduler/``).
"""
from __future__ import annotations

from pathlib import Path

DIGITS_TEACHER_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits_teacher"
LATENT_DIGITS_TEACHER_DIR = Path(__file__).resolve().parent.parent / "assets" / "latent_digits_teacher"
