"""Built-in teachers: small diffusers UNets trained by pyevo and shipped inside the package.

The digits teacher is a 16x16 grayscale ``UNet2DModel`` trained on the digits training split by
``python -m pyevo.teachers.digits``; it lives in ``DIGITS_TEACHER_DIR`` as a ``DDPMPipeline`` folder
and loads, like every teacher, through ``pyevo.teacher.load_teacher("digits")``.
"""
from __future__ import annotations

from pathlib import Path

DIGITS_TEACHER_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits_teacher"
