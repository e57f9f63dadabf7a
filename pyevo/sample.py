"""DDIM sampling from a diffusers UNet, and a CLI that saves a sample grid.

    python -m pyevo.sample [--out runs/teacher_samples.png] [--n 64] [--steps 50] [--seed 0]
                           [--teacher FOLDER] [--scheduler DIR] [--vae DIR] [--label N]
                           [--conditions FILE] [--guidance_scale S]

``--teacher`` defaults to the built-in digits teacher. It is loaded by ``pyevo.teacher.load_teacher``:
a pipeline folder (``unet/`` and ``scheduler/`` inside, as ``DDPMPipeline.save_pretrained`` writes
it) or a bare ``UNet2DModel`` folder with ``--scheduler DIR``. A latent teacher's samples are decoded
by its pipeline's ``vae/`` or ``vqvae/`` (or ``--vae DIR``). A class-conditional UNet samples
``--label`` (default: labels cycling through its classes). A text-conditional UNet2DConditionModel
samples the prompts of ``--conditions FILE`` in turn (their states, or a .txt of prompts for the
pipeline's text encoder; see ``pyevo.conditions``) with classifier-free guidance ``--guidance_scale``.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image
from tqdm import tqdm

from pyevo.autoencoder import check_latent_teacher, teacher_autoencoder
from pyevo.data import to_unit_range
from pyevo.teacher import (TeacherError, conditioning, is_class_conditional, is_text_conditional, load_teacher,
                           model_device, num_class_embeds, resolve_teacher_folder, sample_shape,
                           takes_added_conditions)

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
    class_labels: torch.Tensor | None = None,
    clip_output: bool = True,
    encoder_hidden_states: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    negative_encoder_hidden_states: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    negative_added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    done: Sequence[torch.Tensor] = (),
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """``n`` DDIM samples (N, C, H, W), deterministic given ``seed``: images clamped to [-1, 1], or,
    with ``clip_output=False``, latents as they come (a latent teacher's, for its decoder).

    The scheduler is a ``DDIMScheduler`` built from ``scheduler_config`` (e.g. the teacher's DDPM
    config), so the UNet's output is read as the config's ``prediction_type`` (epsilon, v or
    sample). All initial noise is drawn up front from one generator, so the samples do not depend
    on ``batch_size``; with ``eta > 0`` the per-step noise comes from the same generator. A
    class-conditional UNet needs ``class_labels`` (n,), one per sample; a text-conditional one
    ``encoder_hidden_states`` (n, L, D). With ``guidance_scale`` > 1 the prediction is classifier-free
    guided as StableDiffusionPipeline guides it, ``uncond + scale * (cond - uncond)``, the unconditional
    prediction made from ``negative_encoder_hidden_states`` (1, L, D), both in one doubled batch.
    An SDXL-shaped UNet (``addition_embed_type="text_time"``) also needs ``added_cond_kwargs``
    (``text_embeds`` (n, P), ``time_ids`` (n, K)) and, guided, ``negative_added_cond_kwargs`` ((1, P),
    (1, K)), batched as StableDiffusionXLPipeline batches them.

    Resuming (the evaluation after a kill): ``done`` holds the outputs of the first batches, drawn before,
    which are taken as they are, and ``on_batch(index, output)`` is called with each batch drawn now. With
    ``eta`` 0 every batch depends on its own initial noise alone, so the result equals one uninterrupted
    call; with ``eta`` > 0 the per-step noise runs through all batches and ``done`` is refused.
    """
    if n < 1 or steps < 1:
        raise ValueError(f"need n >= 1 and steps >= 1, got n={n}, steps={steps}")
    if is_class_conditional(unet) != (class_labels is not None):
        raise ValueError("class_labels are needed exactly when the UNet is class-conditional")
    if class_labels is not None and class_labels.shape != (n,):
        raise ValueError(f"class_labels must have shape ({n},), got {tuple(class_labels.shape)}")
    if is_text_conditional(unet) != (encoder_hidden_states is not None):
        raise ValueError("encoder_hidden_states are needed exactly when the UNet is text-conditional")
    if encoder_hidden_states is not None and (encoder_hidden_states.ndim != 3 or len(encoder_hidden_states) != n):
        raise ValueError(f"encoder_hidden_states must be ({n}, L, D), got {tuple(encoder_hidden_states.shape)}")
    if takes_added_conditions(unet) != (added_cond_kwargs is not None):
        raise ValueError("added_cond_kwargs are needed exactly when the UNet's addition_embed_type is 'text_time'")
    if added_cond_kwargs is not None and any(len(t) != n for t in added_cond_kwargs.values()):
        raise ValueError(f"added_cond_kwargs must have {n} rows, got "
                         f"{ {k: tuple(t.shape) for k, t in added_cond_kwargs.items()} }")
    guided = guidance_scale > 1.0
    if guided and (encoder_hidden_states is None or negative_encoder_hidden_states is None):
        raise ValueError("guidance_scale > 1 needs encoder_hidden_states and negative_encoder_hidden_states")
    if guided and (added_cond_kwargs is None) != (negative_added_cond_kwargs is None):
        raise ValueError("guidance_scale > 1 with added_cond_kwargs needs negative_added_cond_kwargs")
    if done and eta != 0:
        raise ValueError("done batches can only be resumed from with eta 0 (the per-step noise runs through all batches)")
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *sample_shape(unet)), generator=gen)
    was_training = unet.training
    unet.eval()
    outputs = []
    bar = tqdm(total=steps * math.ceil(n / batch_size), desc="ddim", disable=not progress, mininterval=2.0)
    device = model_device(unet)
    chunks = len(noise.split(batch_size))
    labels = [None] * chunks if class_labels is None else class_labels.split(batch_size)
    states = [None] * chunks if encoder_hidden_states is None else encoder_hidden_states.split(batch_size)
    added = ([None] * chunks if added_cond_kwargs is None else
             [dict(zip(added_cond_kwargs, parts)) for parts in zip(*(t.split(batch_size)
                                                                      for t in added_cond_kwargs.values()))])
    negative = None if not guided else negative_encoder_hidden_states.to(device)
    negative_added = (None if not guided or negative_added_cond_kwargs is None else
                      {k: t.to(device) for k, t in negative_added_cond_kwargs.items()})
    if len(done) > chunks or any(len(d) != len(x) for d, x in zip(done, noise.split(batch_size))):
        raise ValueError(f"done holds {len(done)} batches that are not the first of {chunks} batches of {batch_size}")
    for index, (x, y, s, a) in enumerate(zip(noise.split(batch_size), labels, states, added)):
        if index < len(done):
            outputs.append(done[index])
            bar.update(steps)
            continue
        x = x.to(device)  # the noise is drawn on the CPU, so every device gets the same samples
        y = None if y is None else y.to(device)
        s = None if s is None else s.to(device)
        a = None if a is None else {k: t.to(device) for k, t in a.items()}
        if guided:  # one forward of [unconditional rows; conditional rows], as StableDiffusionPipeline runs it
            s = torch.cat([negative.expand(len(x), *negative.shape[1:]), s])
            y = None if y is None else torch.cat([y, y])
            a = None if a is None else {k: torch.cat([negative_added[k].expand(len(x), -1), t]) for k, t in a.items()}
        for t in scheduler.timesteps:
            if guided:
                unconditional, conditional = unet(torch.cat([x, x]), t, **conditioning(unet, y, s, a)).sample.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            else:
                prediction = unet(x, t, **conditioning(unet, y, s, a)).sample
            x = scheduler.step(prediction, t, x, eta=eta, generator=gen).prev_sample
            bar.update()
        outputs.append((x.clamp(-1.0, 1.0) if clip_output else x).cpu())
        if on_batch is not None:
            on_batch(index, outputs[-1])
    bar.close()
    unet.train(was_training)
    return torch.cat(outputs)


def sample_images(unet: UNet2DModel, scheduler_config: dict, n: int, steps: int = 50, seed: int = 0,
                  codec=None, progress: bool = True, class_labels: torch.Tensor | None = None,
                  batch_size: int = 250, **conditions) -> torch.Tensor:
    """``n`` images in [-1, 1] from ``unet``: its DDIM samples, or, for a latent teacher (``codec``, a
    :class:`pyevo.autoencoder.LatentCodec`), its latent samples decoded as a latent pipeline decodes them.
    ``conditions``: a text-conditional UNet's ``encoder_hidden_states`` (and ``added_cond_kwargs``) and
    guidance, as ddim_sample takes them."""
    samples = ddim_sample(unet, scheduler_config, n, steps, seed, batch_size=batch_size, progress=progress,
                          class_labels=class_labels, clip_output=codec is None, **conditions)
    return samples if codec is None else codec.decode(samples)


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
    teacher: str = "digits"
    scheduler: str = ""  # a scheduler folder, for a bare UNet folder
    vae: str = ""  # latent teachers: the autoencoder folder (default: the teacher pipeline's vae/ or vqvae/)
    label: int = -1  # class-conditional teachers: the label of every sample (-1: cycle through classes)
    conditions: str = ""  # text-conditional teachers: states (.safetensors) or prompts (.txt), see pyevo.conditions
    guidance_scale: float = 7.5  # text-conditional teachers: classifier-free guidance (<= 1: none)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m pyevo.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in fields(SampleConfig):
        parser.add_argument("--" + field.name, type=type(field.default), default=field.default)
    cfg = SampleConfig(**vars(parser.parse_args(argv)))
    if cfg.n < 1 or cfg.steps < 1:
        raise SystemExit(f"error: --n and --steps must be positive (got n={cfg.n}, steps={cfg.steps})")
    from pyevo.conditions import ConditionsError, added_condition_rows, condition_rows, guidance, load_conditions

    try:
        unet, scheduler = load_teacher(cfg.teacher, cfg.scheduler or None)
        codec = teacher_autoencoder(cfg.teacher, cfg.vae or None)
        if codec is not None:
            check_latent_teacher(codec, unet)
        conditions = load_conditions(cfg.conditions, unet, resolve_teacher_folder(cfg.teacher))
    except (TeacherError, ConditionsError) as err:
        raise SystemExit(f"error: {err}") from None
    labels = None
    if is_class_conditional(unet):
        classes = num_class_embeds(unet)
        if cfg.label >= 0:
            if classes is not None and cfg.label >= classes:
                raise SystemExit(f"error: --label {cfg.label} is outside the teacher's {classes} classes")
            labels = torch.full((cfg.n,), cfg.label, dtype=torch.long)
        elif classes is None:
            raise SystemExit("error: this teacher's labels are not bounded by num_class_embeds: pass --label N")
        else:
            labels = torch.arange(cfg.n) % classes
    samples = sample_images(unet, scheduler.config, cfg.n, steps=cfg.steps, seed=cfg.seed, codec=codec,
                            class_labels=labels, encoder_hidden_states=condition_rows(conditions, cfg.n),
                            added_cond_kwargs=added_condition_rows(conditions, cfg.n),
                            **guidance(conditions, cfg.guidance_scale))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(samples).save(out)
    log.info("wrote %d samples (%d DDIM steps, seed %d) from %s to %s", cfg.n, cfg.steps, cfg.seed, cfg.teacher, out)


if __name__ == "__main__":
    main(sys.argv[1:])
