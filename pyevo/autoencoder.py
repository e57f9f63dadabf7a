"""Latent teachers: the autoencoder that maps images to the UNet's latents and back.

A latent teacher's UNet works on ``(z - shift_factor) * scaling_factor`` where ``z`` is the
autoencoder's latent (Stable Diffusion's and ``LDMPipeline``'s convention: they decode
``latents / scaling_factor``). pyevo encodes the training images once, trains and searches on the
latents, and decodes samples for every image-space figure (FD/KID, PSNR/SSIM against the teacher,
the sample grid). The autoencoder is never trained or changed.

The autoencoder comes from ``--vae DIR`` (an ``AutoencoderKL`` or ``VQModel`` folder, or a pipeline
folder holding one in ``vae/`` or ``vqvae/``), or from the teacher's own pipeline folder.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn

from pyevo.teacher import (TeacherError, first_line, model_device, read_config_json, resolve_teacher_folder,
                           sample_shape)

log = logging.getLogger(__name__)

AUTOENCODERS = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
# Where pipelines keep their autoencoder: diffusers' latent pipelines call it vae, LDMPipeline vqvae.
AUTOENCODER_SUBFOLDERS = ("vae", "vqvae")
POSTERIORS = ("mode", "sample")


class AutoencoderError(TeacherError):
    """The autoencoder a user named cannot be used with the teacher (missing, not a VAE, mismatched)."""


@dataclass
class LatentCodec:
    """An autoencoder with its latent scaling: images in [-1, 1] <-> the UNet's latents."""

    vae: nn.Module
    folder: Path | None = None  # where it was loaded from (None: built in memory, e.g. while training)

    @property
    def kind(self) -> str:
        return type(self.vae).__name__

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.get("scaling_factor", 1.0) or 1.0)

    @property
    def shift_factor(self) -> float:
        return float(self.vae.config.get("shift_factor", 0.0) or 0.0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def downsampling(self) -> int:
        """Image side over latent side: one halving per encoder level after the first."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of the images whose latents have ``latent_shape``."""
        _, height, width = latent_shape
        return (self.image_channels, height * self.downsampling, width * self.downsampling)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, posterior: str = "mode", seed: int = 0, batch_size: int = 64,
               done: Sequence[torch.Tensor] = (), on_batch: Callable[[int, torch.Tensor], None] | None = None
               ) -> torch.Tensor:
        """The UNet's latents of ``images`` (N, C, H, W) in [-1, 1], on the CPU, in the VAE's dtype.

        ``posterior`` picks an ``AutoencoderKL``'s latent: the mode (mean) of its Gaussian, or one
        draw from it (seeded); a ``VQModel`` has one latent (before quantisation, as LDM trains).
        ``done``: the first batches' latents, encoded before (a killed run's, kept by ``on_batch(index,
        latents)``, which is called with each batch encoded now): taken as they are, their posterior
        noise drawn again, so that the rest equals an uninterrupted encoding.
        """
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {', '.join(POSTERIORS)}, got {posterior!r}")
        generator = torch.Generator().manual_seed(seed)
        device, dtype = model_device(self.vae), self.dtype
        draws = posterior == "sample" and not isinstance(self.vae, VQModel)
        chunks = []
        for index, chunk in enumerate(images.split(batch_size)):
            if index < len(done):
                if draws:  # the generator moves on as it did when this batch was encoded
                    torch.randn(done[index].shape, generator=generator)
                chunks.append(done[index])
                continue
            encoded = self.vae.encode(chunk.to(device, dtype))
            if isinstance(self.vae, VQModel):
                latent = encoded.latents
            else:
                dist = encoded.latent_dist
                latent = dist.mode() if posterior == "mode" else (
                    dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(device, dtype))
            chunks.append(((latent - self.shift_factor) * self.scaling_factor).cpu())
            if on_batch is not None:
                on_batch(index, chunks[-1])
        return torch.cat(chunks)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images in [-1, 1] (on the CPU, float32) of the UNet's ``latents``, as a pipeline decodes them
        (a ``VQModel`` quantises first, as ``LDMPipeline`` does)."""
        device, dtype = model_device(self.vae), self.dtype
        chunks = [self.decode_batch(chunk.to(device, dtype)).clamp(-1.0, 1.0).cpu()
                  for chunk in latents.split(batch_size)]
        return torch.cat(chunks).float()

    def decode_batch(self, latents: torch.Tensor) -> torch.Tensor:
        """One decoder call, in the latents' device and dtype (what a pipeline runs once per batch)."""
        return self.vae.decode(latents / self.scaling_factor + self.shift_factor).sample


def load_autoencoder(path: str | Path) -> LatentCodec:
    """An ``AutoencoderKL`` / ``VQModel`` folder, or a pipeline folder with one in vae/ or vqvae/, in eval mode."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise AutoencoderError(f"VAE folder not found: {folder}")
    found = _autoencoder_folder(folder)
    if found is None:
        raise AutoencoderError(f"{folder} holds no autoencoder (no config.json, vae/ or vqvae/)")
    config = read_config_json(found / "config.json", f"{found} holds no config.json")
    class_name = config.get("_class_name")
    if class_name not in AUTOENCODERS:
        raise AutoencoderError(f"{found} holds a {class_name}, not a VAE; pyevo takes {' or '.join(AUTOENCODERS)}")
    try:
        vae = AUTOENCODERS[class_name].from_pretrained(found, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
        raise AutoencoderError(f"cannot load the {class_name} in {found}: {first_line(error)}") from None
    return LatentCodec(vae.eval().requires_grad_(False), found)


def has_own_autoencoder(teacher: str) -> bool:
    """Whether the teacher's pipeline folder holds an autoencoder (a latent teacher), without loading it."""
    folder = resolve_teacher_folder(teacher)
    return folder.is_dir() and any((folder / sub / "config.json").is_file() for sub in AUTOENCODER_SUBFOLDERS)


def teacher_autoencoder(teacher: str, vae: str | None = None) -> LatentCodec | None:
    """The run's autoencoder: ``vae`` when given, else the teacher pipeline folder's own, else None
    (a pixel teacher)."""
    if vae:
        return load_autoencoder(vae)
    return load_autoencoder(resolve_teacher_folder(teacher)) if has_own_autoencoder(teacher) else None


def image_shape(unet: nn.Module, codec: LatentCodec | None) -> tuple[int, int, int]:
    """(C, H, W) of the images a model makes: its samples, or a latent model's decoded by ``codec``."""
    return sample_shape(unet) if codec is None else codec.image_shape(sample_shape(unet))


def check_latent_teacher(codec: LatentCodec, unet: nn.Module) -> None:
    """The autoencoder's latents are what the UNet takes: channels, and size where the VAE states one."""
    channels, height, width = sample_shape(unet)
    if codec.latent_channels != channels:
        raise AutoencoderError(f"the {codec.kind} in {codec.folder} makes {codec.latent_channels}-channel latents, "
                               f"but the UNet takes {channels} channels")
    if codec.image_channels not in (1, 3):
        raise AutoencoderError(f"the {codec.kind} in {codec.folder} takes {codec.image_channels}-channel images; "
                               "pyevo reads grey (1) or RGB (3) images")
    size = codec.vae.config.get("sample_size")
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        latent = (size[0] // codec.downsampling, size[1] // codec.downsampling)
        if latent != (height, width):
            raise AutoencoderError(f"the {codec.kind} in {codec.folder} maps {size[0]}x{size[1]} images to "
                                   f"{latent[0]}x{latent[1]} latents, but the UNet's sample_size is {height}x{width}")


def _autoencoder_folder(folder: Path) -> Path | None:
    if (folder / "config.json").is_file():
        return folder
    for sub in AUTOENCODER_SUBFOLDERS:
        if (folder / sub / "config.json").is_file():
            return folder / sub
    return None
