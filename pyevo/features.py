"""Feature spaces for the distribution metrics (Fréchet distance, KID) on any image data.

Every extractor takes images in [-1, 1], shape (N, C, H, W), returns (N, num_features) float64
features and exposes ``num_features``. The kinds (``load_feature_extractor``):

- ``inception``: torchmetrics' InceptionV3 (``NoTrainInceptionV3``, the 2048-d pool features that
  ``FrechetInceptionDistance(feature=2048)`` uses), so FD here is the usual FID. It needs the
  ``torch-fidelity`` package (which in turn imports torchvision) and torch-fidelity's weights file:
  downloaded once into the torch hub cache, or given as a local file. C in {1, 3}, any H, W.
- ``digits``: the shipped digits classifier's 64-d embedding; (N, 1, 16, 16) digits, or (N, 1, 32, 32) resized to 16x16.
- ``none``: no feature space; callers skip the distribution metrics.

``extract_features`` runs an extractor over a set in batches (``pyevo.metrics.distribution_metrics``
computes FD and KID from the result).
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn as nn

from pyevo.classifier import DigitsClassifier, load_digits_classifier
from pyevo.data import DIGITS_SIZE, at_digits_size, is_digits_shape
from pyevo.teacher import model_device

log = logging.getLogger(__name__)

FEATURE_KINDS = ("inception", "digits", "none")
INCEPTION_FEATURE_DIM = 2048
# torch-fidelity's name for the TF-ported InceptionV3 that FID implementations agree on.
INCEPTION_NAME = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
_MAX_REASON_CHARS = 200


class FeatureUnavailable(RuntimeError):
    """A feature extractor cannot be built here; the message is one line saying why and what to do."""

    def __init__(self, reason: str):
        super().__init__(" ".join(line.strip() for line in reason.splitlines() if line.strip()))


def _brief(exc: BaseException) -> str:
    # Errors such as load_state_dict's list hundreds of keys over many lines: keep one short line.
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def _check_batch(images: torch.Tensor, channels: tuple[int, ...], size: tuple[int, int] | None, name: str) -> None:
    shape_ok = images.ndim == 4 and images.shape[1] in channels
    if size is not None:
        shape_ok = shape_ok and tuple(images.shape[2:]) == size
    if not shape_ok:
        c = channels[0] if len(channels) == 1 else "C in {" + ", ".join(map(str, channels)) + "}"
        hw = f"{size[0]}, {size[1]}" if size is not None else "H, W"
        raise ValueError(f"{name} takes images of shape (N, {c}, {hw}), got {tuple(images.shape)}")


class ClassifierFeatures(nn.Module):
    """The classifier's embedding as a torchmetrics feature extractor.

    torchmetrics passes a custom module's input through unchanged (its ``normalize`` / uint8
    conversion only applies to the built-in Inception), reads ``num_features`` instead of probing
    with a dummy image, and casts the final distance to the features' dtype, so the features are
    returned as float64 to keep the whole computation in float64. ``train()`` is a no-op: the
    classifier must stay in eval mode (BatchNorm statistics, no dropout).
    """

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.config.feature_dim
        self.image_shape = (classifier.config.in_channels, classifier.config.image_size, classifier.config.image_size)

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 4 and self.image_shape == (1, DIGITS_SIZE, DIGITS_SIZE) and is_digits_shape(images.shape[1:]):
            images = at_digits_size(images)  # 32x32 digits (latent-digits) seen at the classifier's size
        channels, height, width = self.image_shape
        _check_batch(images, (channels,), (height, width), "the digits feature space")
        return self.classifier.features(images.float().to(model_device(self))).double()


class InceptionFeatures(nn.Module):
    """torchmetrics' InceptionV3 on [-1, 1] images with 1 or 3 channels and any size.

    The network takes uint8 RGB in [0, 255] and resizes to 299x299 itself. Grey images are
    repeated to 3 channels. Values are rounded to the nearest level, as saving the samples to PNG
    would, so the features match an FID computed from image files.
    """

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception.eval()
        self.num_features = INCEPTION_FEATURE_DIM

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_batch(images, (1, 3), None, "the inception feature space")
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        levels = ((rgb.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        return self.inception(levels.to(model_device(self))).double()


def _inception_weights_hint() -> str:
    return (f"download torch-fidelity's {INCEPTION_WEIGHTS_FILE} where you have network access and pass its path "
            f"as the weights file, or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}")


def _check_weights_file(weights: str | Path) -> None:
    """Reject a missing or unreadable file before torch-fidelity unpickles it with weights_only=False."""
    path = Path(weights)
    if not path.is_file():
        raise FeatureUnavailable(f"Inception weights file not found: {path}; {_inception_weights_hint()}")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling raises many types; all mean "not a plain state dict"
        raise FeatureUnavailable(
            f"cannot read Inception weights from {path} ({_brief(exc)}); expected torch-fidelity's "
            f"{INCEPTION_WEIGHTS_FILE}") from exc


def _load_inception(weights: str | Path | None) -> InceptionFeatures:
    if weights is not None:
        _check_weights_file(weights)
    install_hint = ("`pip install torch-fidelity` (it pulls torchvision: take the build that matches your torch, "
                    "e.g. the CPU one for a CPU torch), or choose the digits or none feature space")
    try:
        # torchmetrics imports torch-fidelity, and torch-fidelity torchvision, when this module loads:
        # a missing or mismatched torchvision fails here (ImportError, or RuntimeError from its ops).
        from torchmetrics.image.fid import NoTrainInceptionV3
    except Exception as exc:
        raise FeatureUnavailable(
            f"Inception features need torch-fidelity and a working torchvision ({_brief(exc)}); {install_hint}") from exc
    if importlib.util.find_spec("torch_fidelity") is None:
        raise FeatureUnavailable(f"Inception features need the torch-fidelity package, which is not installed; {install_hint}")
    source = str(weights) if weights is not None else "the torch hub cache (downloaded if missing)"
    log.info("loading InceptionV3 weights from %s", source)
    try:
        inception = NoTrainInceptionV3(
            name=INCEPTION_NAME, features_list=[str(INCEPTION_FEATURE_DIM)],
            feature_extractor_weights_path=None if weights is None else str(weights))
    except Exception as exc:  # download (URLError, HTTPError, ...) or state-dict mismatch
        raise FeatureUnavailable(f"cannot load the Inception weights from {source} ({_brief(exc)}); "
                                 f"{_inception_weights_hint()}") from exc
    return InceptionFeatures(inception)


def load_feature_extractor(kind: str, weights: str | Path | None = None) -> nn.Module | None:
    """The feature extractor of ``kind`` (one of ``FEATURE_KINDS``); ``None`` for ``"none"``.

    ``weights``: for ``inception`` a local torch-fidelity InceptionV3 weights file (else the torch
    hub cache, downloading if needed); for ``digits`` a classifier folder (else the shipped one).
    Raises ``FeatureUnavailable`` when Inception cannot be built here.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; choose one of {', '.join(FEATURE_KINDS)}")
    if kind == "none":
        if weights is not None:
            raise ValueError("feature kind 'none' has no model, so it takes no weights")
        return None
    if kind == "digits":
        return ClassifierFeatures(load_digits_classifier() if weights is None else load_digits_classifier(weights))
    return _load_inception(weights)


@torch.no_grad()
def extract_features(images: torch.Tensor, extractor: nn.Module, batch_size: int = 500) -> torch.Tensor:
    """``extractor``'s features of ``images``, computed ``batch_size`` images at a time, as float64."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return torch.cat([extractor(chunk).double() for chunk in images.split(batch_size)])
