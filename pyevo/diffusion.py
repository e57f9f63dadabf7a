"""The forward process as pyevo trains on it: noised batches, the teacher's prediction type, conditions.

Every loss and sampler follows the teacher's own ``prediction_type`` (read from its scheduler):
``epsilon`` predicts the noise, ``v_prediction`` the velocity ``alpha_t * noise - sigma_t * x0``,
``sample`` the clean image. Batches are drawn on the CPU from one generator and then moved to the
run's device, so the same seed gives the same batches on every device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class ImageSet:
    """Images in [-1, 1] (N, C, H, W) (or a latent teacher's latents) and their conditions: for
    class-conditional teachers their labels (N,), for text-conditional ones the encoder states each
    image was drawn for (N, L, D), and for SDXL-shaped ones also its ``added_cond_kwargs`` rows
    (``text_embeds`` (N, P), ``time_ids`` (N, K))."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        named = {"labels": self.labels, "encoder_hidden_states": self.encoder_hidden_states,
                 **(self.added_cond_kwargs or {})}
        for name, value in named.items():
            if value is not None and len(value) != len(self.images):
                raise ValueError(f"{len(value)} {name} for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor | slice) -> "ImageSet":
        return ImageSet(self.images[index], None if self.labels is None else self.labels[index],
                        None if self.encoder_hidden_states is None else self.encoder_hidden_states[index],
                        select_rows(self.added_cond_kwargs, index))

    def tensors(self) -> list[torch.Tensor]:
        """The images and whichever conditions the set has (for digests)."""
        added = [self.added_cond_kwargs[key] for key in sorted(self.added_cond_kwargs or {})]
        return [t for t in (self.images, self.labels, self.encoder_hidden_states, *added) if t is not None]


def select_rows(tensors: dict[str, torch.Tensor] | None, index, device: torch.device | str | None = None
                ) -> dict[str, torch.Tensor] | None:
    """Some rows of every tensor of a dict of row-aligned tensors (``added_cond_kwargs``), optionally
    moved to ``device``; None stays None."""
    if tensors is None:
        return None
    return {key: value[index] if device is None else value[index].to(device) for key, value in tensors.items()}


@dataclass
class NoisyBatch:
    """One training batch: the noised images, their timesteps, and what the teacher should predict."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor  # the true target of the teacher's prediction type
    labels: torch.Tensor | None
    encoder_hidden_states: torch.Tensor | None = None
    added_cond_kwargs: dict[str, torch.Tensor] | None = None


def prediction_type(scheduler) -> str:
    """The teacher's prediction type, as its scheduler config names it (diffusers' default: epsilon)."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {kind!r} is not supported; pyevo supports {', '.join(PREDICTION_TYPES)}")
    return kind


def training_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What a model of the scheduler's prediction type should output for ``add_noise(clean, noise, t)``."""
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return clean
    return scheduler.get_velocity(clean, noise, timesteps)


def noisy_batch(data: ImageSet, scheduler, batch_size: int, generator: torch.Generator,
                device: torch.device | str = "cpu", shard: tuple[int, int] | None = None) -> NoisyBatch:
    """Images drawn with replacement, noised at timesteps uniform over the schedule, on ``device``.

    With ``shard = (rank, world_size)`` the whole batch of ``batch_size`` is drawn (the generator
    advances as in one process) and rank ``rank`` keeps its contiguous ``batch_size / world_size``
    rows of it: every rank, drawing from the same seed, gets its own disjoint slice of the same
    global batch (what a DistributedSampler does, but equal to the one-process run; pyevo/distributed.py).
    """
    index = torch.randint(len(data), (batch_size,), generator=generator)
    noise = torch.randn((batch_size, *data.images.shape[1:]), generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    if shard is not None:
        rank, world = shard
        rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        index, noise, timesteps = index[rows], noise[rows], timesteps[rows]
    clean = data.images[index]
    labels = None if data.labels is None else data.labels[index].to(device)
    states = None if data.encoder_hidden_states is None else data.encoder_hidden_states[index].to(device)
    added = select_rows(data.added_cond_kwargs, index, device)
    clean, noise, timesteps = clean.to(device), noise.to(device), timesteps.to(device)
    return NoisyBatch(scheduler.add_noise(clean, noise, timesteps), timesteps, noise,
                      training_target(scheduler, clean, noise, timesteps), labels, states, added)


def uniform_labels(count: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` class labels drawn uniformly from ``range(num_classes)`` (data-free mode)."""
    return torch.randint(0, num_classes, (count,), generator=generator)


def balanced_labels(count: int, classes: torch.Tensor) -> torch.Tensor:
    """``count`` labels cycling through ``classes``: equal counts per class, for evaluation."""
    return classes[torch.arange(count) % len(classes)]
