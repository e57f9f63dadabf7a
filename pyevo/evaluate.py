"""Quality and speed of teacher and student, compared on equal terms.

Samples come from ``pyevo.sample.ddim_sample`` with the same seed, hence the same initial noise,
for both models, so PSNR/SSIM between the two sets measure how closely the student follows the teacher.
Latency is the whole model timed on the run's device at the deployment batch and dtype, together
with its searched blocks, so the per-block estimate can be checked against the same timings.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from pyevo.config import LatencyConfig
from pyevo.latency import DTYPES, time_calls
from pyevo.teacher import BlockCall

log = logging.getLogger(__name__)


@contextlib.contextmanager
def deployed(unet: nn.Module, batch: int, dtype: str, device: str) -> Iterator[Callable[[], Any]]:
    """One forward of ``unet`` at the deployment batch, dtype and device, as a call to time.

    The model is cast for the duration and returned to the CPU in float32 afterwards.
    """
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    model = _cast(unet, device, DTYPES[dtype]).eval()
    sample = torch.randn(batch, unet.config.in_channels, *size, device=device, dtype=DTYPES[dtype])
    timesteps = torch.full((batch,), 500, device=device, dtype=torch.long)
    try:
        yield lambda: model(sample, timesteps)
    finally:
        _cast(unet, "cpu", torch.float32)


def network_latency(networks: Mapping[str, nn.Module], calls: Mapping[str, BlockCall], batch: int, dtype: str,
                    device: str, config: LatencyConfig) -> dict[str, dict]:
    """Each network whole and block by block, all timed in turn (:func:`pyevo.latency.time_calls`).

    ``calls`` are the searched blocks' recorded inputs at the deployment batch, on ``device`` in
    ``dtype``. Per network: ``latency_ms`` (the whole forward), ``blocks_ms`` (each searched block
    on its recorded inputs) and ``stem_ms``, the whole minus its blocks: conv_in, the time
    embedding, the head and what passes between blocks, which no block search changes.
    """
    with contextlib.ExitStack() as stack:
        fns = {}
        for network, unet in networks.items():
            fns[network] = stack.enter_context(deployed(unet, batch, dtype, device))
            for name, call in calls.items():
                block = unet.get_submodule(name)
                fns[(network, name)] = lambda block=block, call=call: block(*call.args, **call.kwargs)
        times = time_calls(fns, device, config.warmup, config.network_repeats, config.threads, config.cuda_graph)
    result = {}
    for network in networks:
        blocks = {name: times[(network, name)] for name in calls}
        result[network] = {"latency_ms": times[network], "blocks_ms": blocks,
                           "stem_ms": times[network] - sum(blocks.values())}
    return result


def _cast(unet: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    """``unet.to(device, dtype)``, without diffusers' warning when no module must stay float32.

    ``ModelMixin.to`` warns on every dtype cast once its keep-in-float32 list exists, even empty.
    """
    if getattr(unet, "_keep_in_fp32_modules", None):
        return unet.to(device=device, dtype=dtype)
    return nn.Module.to(unet, device=device, dtype=dtype)


def sample_quality(samples: torch.Tensor, reference: torch.Tensor | None) -> dict:
    """Fréchet distance to ``reference`` and class shares, with the digits classifier's features.

    Only meaningful for digits-like samples (1 channel, 16x16); for other data it returns nulls.
    """
    if reference is None or samples.shape[1:] != (1, 16, 16):
        return {"fd": None, "class_coverage": None}
    from pyevo.metrics import class_coverage, frechet_distance

    return {"fd": frechet_distance(samples, reference), "class_coverage": class_coverage(samples)}


def paired_similarity(student_samples: torch.Tensor, teacher_samples: torch.Tensor) -> dict:
    """PSNR, SSIM and (digits) class agreement of the student's samples with the teacher's, same noise."""
    from pyevo.metrics import class_agreement, psnr, ssim

    similarity = {"psnr_vs_teacher": psnr(student_samples, teacher_samples),
                  "ssim_vs_teacher": ssim(student_samples, teacher_samples), "class_agreement": None}
    if student_samples.shape[1:] == (1, 16, 16):  # digits-like: the classifier applies
        similarity["class_agreement"] = class_agreement(student_samples, teacher_samples)
    return similarity
