"""Sample-quality metrics; all images in [-1, 1], channels first.

- ``distribution_metrics``: Fréchet distance and KID between two image sets of any shape, in a
  feature space from ``pyevo.features`` (Inception, the digits classifier's embedding, or your
  own module), via torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``;
  computed in float64.
- ``frechet_distance``: the Fréchet distance between two sets of (N, 1, 16, 16) digits (16x16, or 32x32 resized to 16x16) in the
  feature space of the shipped digits classifier (its 64-d penultimate embedding).
- ``class_coverage``: the share of (N, 1, 16, 16) digits the classifier assigns to each class.
- ``class_agreement``: the share of same-noise pairs (teacher, student) in the same class.
- ``psnr`` / ``ssim``: paired comparison of two sets drawn from the same noise (e.g. teacher vs
  student samples), averaged over image pairs.
- ``clip_score``: torchmetrics' CLIP score of images against their prompts, in a local CLIP model
  (``load_clip_model``).
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import torch
import torch.nn as nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from pyevo.classifier import DigitsClassifier, load_digits_classifier
from pyevo.data import DIGITS_IMAGE_SIZES, at_digits_size, is_digits_shape
from pyevo.features import ClassifierFeatures, extract_features

__all__ = [
    "ClassifierFeatures", "class_agreement", "class_coverage", "distribution_metrics", "frechet_distance", "psnr",
    "ssim",
]

DATA_RANGE = (-1.0, 1.0)
# torchmetrics' KID defaults: 100 subsets of (at most) 1000 images, as in the KID paper's code.
KID_SUBSETS = 100
KID_DEFAULT_SUBSET_SIZE = 1000


@lru_cache(maxsize=1)
def _shipped_classifier() -> DigitsClassifier:
    return load_digits_classifier()


def _check_images(images: torch.Tensor, name: str, min_count: int = 1) -> torch.Tensor:
    """Digits as the classifier takes them (16x16; 32x32 digits resized), after checking the shape."""
    if images.ndim != 4 or not is_digits_shape(images.shape[1:]):
        sizes = " or ".join(f"(N, 1, {s}, {s})" for s in DIGITS_IMAGE_SIZES)
        raise ValueError(f"{name} must have shape {sizes}, got {tuple(images.shape)}")
    if images.shape[0] < min_count:
        raise ValueError(f"{name} needs at least {min_count} images, got {images.shape[0]}")
    return at_digits_size(images)


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
    images_a = _check_images(images_a, "images_a", min_count=2)
    images_b = _check_images(images_b, "images_b", min_count=2)
    features = ClassifierFeatures(classifier or _shipped_classifier())
    return _frechet_distance_of_features(
        extract_features(images_a, features, batch_size), extract_features(images_b, features, batch_size))


class _PrecomputedFeatures(nn.Module):
    """Pass-through "extractor": the features are computed once and fed to both FD and KID."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _frechet_distance_of_features(features_real: torch.Tensor, features_fake: torch.Tensor) -> float:
    fd = FrechetInceptionDistance(feature=_PrecomputedFeatures(features_real.shape[1])).to(features_real.device)
    fd.update(features_real, real=True)
    fd.update(features_fake, real=False)
    return float(fd.compute())


def _kernel_inception_distance_of_features(
    features_real: torch.Tensor, features_fake: torch.Tensor, subset_size: int, subsets: int, seed: int
) -> tuple[float, float]:
    with warnings.catch_warnings():
        # Its warning that it keeps every feature in memory: these features are in memory already.
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        kid = KernelInceptionDistance(
            feature=_PrecomputedFeatures(features_real.shape[1]), subsets=subsets, subset_size=subset_size,
        ).to(features_real.device)
    kid.update(features_real, real=True)
    kid.update(features_fake, real=False)
    # KID draws its subsets with torch.randperm on the global CPU generator: seed a private copy of
    # it so the result is reproducible and the caller's random stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return float(kid_mean), float(kid_std)


def _check_image_set(images: torch.Tensor, name: str) -> None:
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 images, got {images.shape[0]}")


def distribution_metrics(
    samples: torch.Tensor,
    reference: torch.Tensor,
    extractor: nn.Module | None,
    batch_size: int = 500,
    kid_subset_size: int | None = None,
    *,
    kid_subsets: int = KID_SUBSETS,
    kid_seed: int = 0,
) -> dict[str, float]:
    """Fréchet distance and KID between ``samples`` and ``reference`` in ``extractor``'s feature space.

    Images in [-1, 1], (N, C, H, W), of any shape the extractor takes (``pyevo.features``). Returns
    ``{"fd", "kid_mean", "kid_std"}``, all computed in float64. KID is the unbiased MMD² with the
    cubic polynomial kernel, averaged over ``kid_subsets`` random subsets of ``kid_subset_size``
    images from each set (default: min(1000, both set sizes)); ``kid_std`` is the population
    standard deviation over subsets, as torchmetrics reports it. The subsets are drawn with
    ``kid_seed``, so equal inputs give equal results. Both metrics are biased by set size (FD
    upwards, KID's spread), so compare values computed with the same sizes.
    """
    if extractor is None:
        raise ValueError("no feature space given (feature kind 'none'): there is nothing to compute FD and KID in")
    _check_image_set(samples, "samples")
    _check_image_set(reference, "reference")
    largest_subset = min(len(samples), len(reference))
    if kid_subset_size is None:
        kid_subset_size = min(KID_DEFAULT_SUBSET_SIZE, largest_subset)
    if not 2 <= kid_subset_size <= largest_subset:
        raise ValueError(f"kid_subset_size must be between 2 and the smaller set size ({largest_subset}), "
                         f"got {kid_subset_size}")
    features_reference = extract_features(reference, extractor, batch_size)
    features_samples = extract_features(samples, extractor, batch_size)
    kid_mean, kid_std = _kernel_inception_distance_of_features(
        features_reference, features_samples, kid_subset_size, kid_subsets, kid_seed)
    return {
        "fd": _frechet_distance_of_features(features_reference, features_samples),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
    }


def class_coverage(images: torch.Tensor, classifier: DigitsClassifier | None = None) -> list[float]:
    """Share of ``images`` the classifier assigns to each class (sums to 1)."""
    images = _check_images(images, "images")
    classifier = classifier or _shipped_classifier()
    predictions = classifier.predict(images.float())
    counts = torch.bincount(predictions, minlength=classifier.config.num_classes)
    return (counts.double() / len(predictions)).tolist()


def class_mixture_distance(images: torch.Tensor, reference_labels: torch.Tensor,
                           classifier: DigitsClassifier | None = None) -> float:
    """Total-variation distance between the class mixture of ``images`` (as the classifier labels
    them) and the mixture of ``reference_labels``: half the L1 distance of the two share vectors, in
    [0, 1]. The mixture apart from per-class quality, which a class-balanced FD measures."""
    classifier = classifier or _shipped_classifier()
    shares = torch.tensor(class_coverage(images, classifier), dtype=torch.float64)
    reference = torch.bincount(reference_labels.long(), minlength=len(shares)).double()
    return 0.5 * (shares - reference / reference.sum()).abs().sum().item()


def class_agreement(a: torch.Tensor, b: torch.Tensor, classifier: DigitsClassifier | None = None) -> float:
    """Share of image pairs (``a[i]``, ``b[i]``) the classifier puts in the same class.

    For two models sampled from the same noise this is how often the student draws the digit the
    teacher draws: a paired measure, unlike the Fréchet distance, which in this feature space moves
    with every shift in the class mixture.
    """
    _check_pair(a, b)
    a, b = _check_images(a, "a"), _check_images(b, "b")
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


class ClipUnavailable(ValueError):
    """The CLIP model folder given for the CLIP score cannot be loaded (missing, not a CLIP model)."""


def load_clip_model(folder: str) -> tuple[nn.Module, object]:
    """A local CLIP model and its processor (``transformers.CLIPModel`` + ``CLIPProcessor`` saved in
    ``folder``, e.g. a download of openai/clip-vit-large-patch14), local files only. Raises
    :class:`ClipUnavailable` in one line."""
    from pathlib import Path

    where = Path(folder).expanduser()
    if not where.is_dir():
        raise ClipUnavailable(f"CLIP model folder not found: {where}")
    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(where, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(where, local_files_only=True)
    except (ImportError, OSError, ValueError, KeyError, TypeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClipUnavailable(f"{where} is not a loadable CLIP model folder (CLIPModel + CLIPProcessor): "
                              f"{message}") from None
    return model, processor


class _ProjectedFeatures(nn.Module):
    """A CLIPModel whose ``get_image_features`` / ``get_text_features`` return the projected embeddings
    as tensors, as torchmetrics' CLIP score expects: transformers 5 returns them in a model output's
    ``pooler_output``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _embeddings(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embeddings(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embeddings(self.model.get_text_features(*args, **kwargs))


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], clip: tuple[nn.Module, object], batch_size: int = 64) -> float:
    """torchmetrics' CLIP score (100 x the cosine of image and text embeddings, floored at 0, averaged)
    of ``images`` (N, C, H, W in [-1, 1]; one channel is repeated to RGB) against their ``prompts``,
    in the local CLIP model ``clip`` (:func:`load_clip_model`)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if images.ndim != 4 or images.shape[1] not in (1, 3) or not len(images):
        raise ValueError(f"CLIP scores (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    model, processor = clip
    metric = CLIPScore(model_name_or_path=lambda: (_ProjectedFeatures(model), processor))
    pixels = images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    for start in range(0, len(pixels), batch_size):
        metric.update(pixels[start:start + batch_size], prompts[start:start + batch_size])
    return float(metric.compute())
