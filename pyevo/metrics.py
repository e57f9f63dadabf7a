"""Sample-quality metrics for 16x16 digits; all images in [-1, 1], shape (N, 1, 16, 16).

- ``frechet_distance``: Fréchet distance between two image sets in the feature space of the
  shipped digits classifier (its 64-d penultimate embedding), via torchmetrics'
  ``FrechetInceptionDistance`` with a custom feature module; computed in float64.
- ``class_coverage``: the share of images the classifier assigns to each class.
- ``class_agreement``: the share of same-noise pairs (teacher, student) in the same class.
- ``psnr`` / ``ssim``: paired comparison of two sets drawn from the same noise (e.g. teacher vs
  student samples), averaged over image pairs.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from pyevo.classifier import DigitsClassifier, load_digits_classifier

DATA_RANGE = (-1.0, 1.0)


@lru_cache(maxsize=1)
def _shipped_classifier() -> DigitsClassifier:
    return load_digits_classifier()


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

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float()).double()


def _check_images(images: torch.Tensor, name: str, min_count: int = 1) -> None:
    if images.ndim != 4 or images.shape[1:] != (1, 16, 16):
        raise ValueError(f"{name} must have shape (N, 1, 16, 16), got {tuple(images.shape)}")
    if images.shape[0] < min_count:
        raise ValueError(f"{name} needs at least {min_count} images, got {images.shape[0]}")


def frechet_distance(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    classifier: DigitsClassifier | None = None,
    batch_size: int = 500,
) -> float:
    """Fréchet distance between the classifier-feature Gaussians of two image sets (float64).

    Symmetric. Like FID it is biased upwards for small sets, so compare values computed with the
    same set sizes.
    """
    _check_images(images_a, "images_a", min_count=2)
    _check_images(images_b, "images_b", min_count=2)
    features = ClassifierFeatures(classifier or _shipped_classifier())
    fd = FrechetInceptionDistance(feature=features, reset_real_features=True)
    for chunk in images_a.split(batch_size):
        fd.update(chunk, real=True)
    for chunk in images_b.split(batch_size):
        fd.update(chunk, real=False)
    return float(fd.compute())


def class_coverage(images: torch.Tensor, classifier: DigitsClassifier | None = None) -> list[float]:
    """Share of ``images`` the classifier assigns to each class (sums to 1)."""
    _check_images(images, "images")
    classifier = classifier or _shipped_classifier()
    predictions = classifier.predict(images.float())
    counts = torch.bincount(predictions, minlength=classifier.config.num_classes)
    return (counts.double() / len(predictions)).tolist()


def class_agreement(a: torch.Tensor, b: torch.Tensor, classifier: DigitsClassifier | None = None) -> float:
    """Share of image pairs (``a[i]``, ``b[i]``) the classifier puts in the same class.

    For two models sampled from the same noise this is how often the student draws the digit the
    teacher draws: a paired measure, unlike the Fréchet distance, which in this feature space moves
    with every shift in the class mixture.
    """
    _check_pair(a, b)
    _check_images(a, "a")
    classifier = classifier or _shipped_classifier()
    return (classifier.predict(a.float()) == classifier.predict(b.float())).double().mean().item()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"paired metrics need two (N, C, H, W) sets of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over image pairs of PSNR (dB), data range 2 ([-1, 1]); ``inf`` when every pair is identical."""
    _check_pair(a, b)
    per_image = peak_signal_noise_ratio(a.double(), b.double(), data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))
    return per_image.mean().item()


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over image pairs of SSIM (Gaussian window, sigma 1.5), data range [-1, 1]; 1 when identical."""
    _check_pair(a, b)
    return structural_similarity_index_measure(a.double(), b.double(), data_range=DATA_RANGE).item()
