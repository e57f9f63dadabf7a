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

from pyevo.config import EvaluateConfig, LatencyConfig
from pyevo.data import is_digits_shape
from pyevo.latency import DTYPES, time_calls
from pyevo.runtime import cast_copy, replays_graphs, run_under
from pyevo.teacher import BlockCall, conditioning, probe_labels, sample_shape

log = logging.getLogger(__name__)


@contextlib.contextmanager
def deployed(unet: nn.Module, batch: int, dtype: str, device: str, encoder_hidden_states: torch.Tensor | None = None,
             added_cond_kwargs: dict[str, torch.Tensor] | None = None
             ) -> Iterator[tuple[Callable[[], Any], nn.Module]]:
    """One forward of ``unet`` at the deployment batch, dtype and device, as a call to time, and
    the model that call runs (whose blocks are the ones to time alone). A text-conditional UNet
    attends to ``encoder_hidden_states`` (batch, L, D), cast likewise, and an SDXL-shaped one embeds its
    ``added_cond_kwargs`` (batch rows each), moved to the device.

    A model not already in the deployment dtype and device is timed as a cast copy, so the caller's
    model keeps its weights exactly (a float16 round trip would round them) and stays where it is.
    """
    weight = next(unet.parameters())
    same = weight.device == torch.device(device) and weight.dtype == DTYPES[dtype]
    model = unet if same else cast_copy(unet, device, DTYPES[dtype])
    was_training = unet.training
    model.eval()
    sample = torch.randn(batch, *sample_shape(unet), device=device, dtype=DTYPES[dtype])
    timesteps = torch.full((batch,), 500, device=device, dtype=torch.long)
    states = None if encoder_hidden_states is None else encoder_hidden_states.to(device, DTYPES[dtype])
    added = None if added_cond_kwargs is None else {k: v.to(device) for k, v in added_cond_kwargs.items()}
    kwargs = conditioning(unet, probe_labels(unet, batch, device), states, added)
    try:
        yield (lambda: model(sample, timesteps, **kwargs)), model
    finally:
        unet.train(was_training)


def network_latency(networks: Mapping[str, nn.Module], calls: Mapping[str, BlockCall], batch: int, dtype: str,
                    device: str, config: LatencyConfig, encoder_hidden_states: torch.Tensor | None = None,
                    added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Each network whole, block by block, and its stem alone, all timed in turn
    (:func:`pyevo.latency.time_calls`) under ``config.runtime`` (``pyevo.runtime``), and each network
    whole under the other runtime too, in the same turns (``runtimes_ms``: eager and lean).

    ``calls`` are the searched blocks' recorded inputs and outputs at the deployment batch, on
    ``device`` in ``dtype``. Per network: ``latency_ms`` (the whole forward), ``blocks_ms`` (each
    searched block on its recorded inputs), ``stem_ms`` (the forward with every searched block
    replaced by a replay of its recorded output: conv_in, the time embedding, the head and what
    passes between blocks, which no block search changes; measured, not a difference, so it is
    never negative) and ``unaccounted_ms``, the whole minus stem and blocks (caches, allocator).
    Text-conditional networks attend to ``encoder_hidden_states`` (batch, L, D), as their blocks' calls do
    (and SDXL-shaped ones take ``added_cond_kwargs``, which their blocks' calls hold in ``temb``).
    """
    runtime = config.runtime
    other = "eager" if runtime == "lean" else "lean"
    with contextlib.ExitStack() as stack:
        fns, graphs = {}, set()

        def add(key, fn, model, under: str) -> None:
            fns[key] = run_under(under, device, fn, [model])
            if replays_graphs(under, config.cuda_graph, device):
                graphs.add(key)

        for network, unet in networks.items():
            forward, model = stack.enter_context(deployed(unet, batch, dtype, device, encoder_hidden_states,
                                                          added_cond_kwargs))
            add(network, forward, model, runtime)
            add((network, other), forward, model, other)
            for name, call in calls.items():
                block = model.get_submodule(name)
                add((network, name), lambda block=block, call=call: block(*call.args, **call.kwargs), model, runtime)
            # The replays are built once, outside the timed call; only the swaps are inside it.
            replays = {name: _Replay(model.get_submodule(name), call.output) for name, call in calls.items()}
            add((network, "stem"), lambda fn=forward, model=model, replays=replays: _with_replayed_blocks(
                model, replays, fn), model, runtime)
        times = time_calls(fns, device, config.warmup, config.network_repeats, config.threads, graphs)
    result = {}
    for network in networks:
        blocks = {name: times[(network, name)] for name in calls}
        stem = times[(network, "stem")]
        result[network] = {"latency_ms": times[network], "blocks_ms": blocks, "stem_ms": stem,
                           "unaccounted_ms": times[network] - stem - sum(blocks.values()),
                           "runtime": runtime, "runtimes_ms": {runtime: times[network], other: times[(network, other)]}}
    return result


class _Replay(nn.Module):
    """Stands in for a block: returns the block's recorded output at no cost."""

    def __init__(self, block: nn.Module, output: Any):
        super().__init__()
        self.output = output
        # UNet2DModel's forward hands each up block as many skip tensors as it has resnets.
        self.resnets = [None] * len(getattr(block, "resnets", ()))

    def forward(self, *args, **kwargs) -> Any:
        return self.output


def _with_replayed_blocks(model: nn.Module, replays: Mapping[str, "_Replay"], forward: Callable[[], Any]) -> Any:
    """``forward()`` with the searched blocks of ``model`` swapped for ``replays`` of their outputs,
    then swapped back (the blocks themselves, and any hooks on them, are not called)."""
    originals = {name: model.get_submodule(name) for name in replays}
    try:
        for name, replay in replays.items():
            _set_submodule(model, name, replay)
        return forward()
    finally:
        for name, block in originals.items():
            _set_submodule(model, name, block)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if isinstance(owner, nn.ModuleList):
        owner[int(child)] = module
    else:
        setattr(owner, child, module)


def decode_latency(codec, latent_shape: tuple[int, int, int], batch: int, dtype: str, device: str,
                   config: LatencyConfig) -> float:
    """Milliseconds of one decoder call on ``batch`` latents at the deployment dtype and device (a cast
    copy of the autoencoder, as :func:`deployed` times a UNet), under ``config.runtime``."""
    from pyevo.autoencoder import LatentCodec

    copy_of = LatentCodec(cast_copy(codec.vae, device, DTYPES[dtype]).eval(), codec.folder)
    latents = torch.randn(batch, *latent_shape, device=device, dtype=DTYPES[dtype])
    decode = run_under(config.runtime, device, lambda: copy_of.decode_batch(latents), [copy_of.vae])
    return time_calls({"decode": decode}, device, config.warmup, config.repeats, config.threads,
                      replays_graphs(config.runtime, config.cuda_graph, device))["decode"]


def quality_features(config: EvaluateConfig, shape: tuple[int, int, int]) -> tuple[nn.Module | None, str, str]:
    """The feature extractor for FD and KID named by ``config.features``, its kind, and a one-line note.

    ``auto`` is the digits classifier for digits-shaped images (1x16x16, 1x32x32) and Inception
    otherwise. When Inception
    cannot be had (offline, no weights, no torch-fidelity) the run goes on with the paired
    metrics only and the note says why.
    """
    from pyevo.features import FeatureUnavailable, load_feature_extractor

    kind = config.features
    if kind == "auto":
        kind = "digits" if is_digits_shape(shape) else "inception"
    if kind == "digits" and not is_digits_shape(shape):
        return None, "none", (f"digits features need 1x16x16 or 1x32x32 images, these are "
                              f"{'x'.join(map(str, shape))}: no FD/KID")
    try:
        extractor = load_feature_extractor(kind, (config.inception_weights or None) if kind == "inception" else None)
    except FeatureUnavailable as error:
        log.warning("no FD/KID: %s", error)
        return None, "none", f"no FD/KID: {error}"
    if extractor is None:
        return None, "none", "features: none (paired metrics only)"
    return extractor, kind, f"FD/KID in {kind} features"


def sample_quality(samples: torch.Tensor, reference: torch.Tensor | None, extractor: nn.Module | None) -> dict:
    """FD and KID to ``reference`` in ``extractor``'s features (nulls without either), and, for
    digits-like samples, the share of each class the digits classifier sees."""
    from pyevo.metrics import class_coverage, distribution_metrics

    quality = {"fd": None, "kid_mean": None, "kid_std": None, "class_coverage": None}
    if extractor is not None and reference is not None:
        quality.update(distribution_metrics(samples, reference, extractor))
    if is_digits_shape(samples.shape[1:]):
        quality["class_coverage"] = class_coverage(samples)
    return quality


def per_class_similarity(student_samples: torch.Tensor, teacher_samples: torch.Tensor, labels: torch.Tensor
                         ) -> dict[str, dict]:
    """Paired figures per conditioning label: how closely the student follows the teacher in each class."""
    return {str(int(label)): paired_similarity(student_samples[labels == label], teacher_samples[labels == label])
            for label in torch.unique(labels)}


def paired_similarity(student_samples: torch.Tensor, teacher_samples: torch.Tensor) -> dict:
    """PSNR, SSIM and (digits) class agreement of the student's samples with the teacher's, same noise."""
    from pyevo.metrics import class_agreement, psnr, ssim

    similarity = {"psnr_vs_teacher": psnr(student_samples, teacher_samples),
                  "ssim_vs_teacher": ssim(student_samples, teacher_samples), "class_agreement": None}
    if is_digits_shape(student_samples.shape[1:]):  # digits-like: the classifier applies
        similarity["class_agreement"] = class_agreement(student_samples, teacher_samples)
    return similarity
