"""DDIM sampling from a diffusers UNet, and a CLI that saves a sample grid.

    python -m pyevo.sample [--out runs/teacher_samples.png] [--n 64] [--steps 50] [--seed 0] [--teacher FOLDER]

``--teacher`` defaults to the built-in digits teacher. It may be a pipeline folder (``unet/`` and
``scheduler/`` inside, as ``DDPMPipeline.save_pretrained`` writes it) or a bare ``UNet2DModel``
folder (``config.json`` + weights), which is then sampled with the digits teacher's schedule.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from PIL import Image
from tqdm import tqdm

from pyevo.data import to_unit_range
from pyevo.teachers import DIGITS_TEACHER_DIR
from pyevo.teachers.digits import build_digits_scheduler

log = logging.getLogger(__name__)


@torch.no_grad()
def ddim_sample(
    unet: UNet2DModel,
    scheduler_config: dict,
    n: int,
    steps: int = 50,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 250,
    progress: bool = True,
) -> torch.Tensor:
    """``n`` DDIM samples (N, C, H, W) in [-1, 1], deterministic given ``seed``.

    The scheduler is a ``DDIMScheduler`` built from ``scheduler_config`` (e.g. the teacher's DDPM
    config). All initial noise is drawn up front from one generator, so the samples do not depend
    on ``batch_size``; with ``eta > 0`` the per-step noise comes from the same generator.
    """
    if n < 1 or steps < 1:
        raise ValueError(f"need n >= 1 and steps >= 1, got n={n}, steps={steps}")
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    noise = torch.randn((n, unet.config.in_channels, *size), generator=gen)
    was_training = unet.training
    unet.eval()
    outputs = []
    bar = tqdm(total=steps * math.ceil(n / batch_size), desc="ddim", disable=not progress, mininterval=2.0)
    device = next(unet.parameters()).device
    for x in noise.split(batch_size):
        x = x.to(device)  # the noise is drawn on the CPU, so every device gets the same samples
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, eta=eta, generator=gen).prev_sample
            bar.update()
        outputs.append(x.clamp(-1.0, 1.0).cpu())
    bar.close()
    unet.train(was_training)
    return torch.cat(outputs)


def load_unet_and_scheduler(folder: str | Path) -> tuple[UNet2DModel, dict]:
    """A UNet and its scheduler config from a pipeline folder or a bare UNet folder.

    Raises ``ValueError`` with a one-line reason when the folder holds neither.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"teacher folder {str(folder)!r} does not exist")
    try:
        if (folder / "unet").is_dir() and (folder / "scheduler").is_dir():
            unet = UNet2DModel.from_pretrained(folder, subfolder="unet", local_files_only=True, low_cpu_mem_usage=False)
            scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
            return unet.eval(), dict(scheduler.config)
        if (folder / "config.json").is_file():
            unet = UNet2DModel.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
            log.info("%s has no scheduler; using the digits teacher's schedule", folder)
            return unet.eval(), dict(build_digits_scheduler().config)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load a diffusers UNet2DModel from {str(folder)!r}: {reason}") from err
    raise ValueError(
        f"{str(folder)!r} is neither a pipeline folder (unet/ + scheduler/) nor a UNet folder (config.json)"
    )


def image_grid(images: torch.Tensor, scale: int = 4) -> Image.Image:
    """Tile [-1, 1] images (N, C, H, W) into a near-square grid, each pixel ``scale`` x ``scale``."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 1
    grid = np.ones((c, rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.float32)
    unit = to_unit_range(images).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = unit[i]
    pixels = (grid * 255.0).round().astype(np.uint8)
    image = Image.fromarray(pixels[0] if c == 1 else pixels.transpose(1, 2, 0))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


@dataclass
class SampleConfig:
    out: str = "runs/teacher_samples.png"
    n: int = 64
    steps: int = 50
    seed: int = 0
    teacher: str = str(DIGITS_TEACHER_DIR)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m pyevo.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in fields(SampleConfig):
        parser.add_argument("--" + field.name, type=type(field.default), default=field.default)
    cfg = SampleConfig(**vars(parser.parse_args(argv)))
    if cfg.n < 1 or cfg.steps < 1:
        raise SystemExit(f"error: --n and --steps must be positive (got n={cfg.n}, steps={cfg.steps})")
    try:
        unet, scheduler_config = load_unet_and_scheduler(cfg.teacher)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    samples = ddim_sample(unet, scheduler_config, cfg.n, steps=cfg.steps, seed=cfg.seed)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(samples).save(out)
    log.info("wrote %d samples (%d DDIM steps, seed %d) from %s to %s", cfg.n, cfg.steps, cfg.seed, cfg.teacher, out)


if __name__ == "__main__":
    main(sys.argv[1:])
