"""Quality of one model's samples at one noise seed, in the digits classifier's feature space.

Per seed: FD and KID against the held-out digits; the class-balanced FD (an equal number of samples of
each class the classifier sees, so the class mixture drops out) and the class mixture's total-variation
distance to the held-out mixture, reported apart; the class shares; and, against the teacher's samples
from the same noise, paired PSNR, SSIM and class agreement. Across seeds: mean ± std of each figure and
the model/teacher ratio of the means (:func:`summarise`).
"""
from __future__ import annotations

import statistics
from typing import Mapping, Sequence

import torch

from pyevo.classifier import load_digits_classifier
from pyevo.data import at_digits_size, digits
from pyevo.metrics import (class_agreement, class_coverage, class_mixture_distance, distribution_metrics,
                           frechet_distance, psnr, ssim)
from pyevo.teachers.evaluate import balanced_index

# Class-balanced FD: this many samples of each predicted class (the teacher checks' setting).
BALANCED_PER_CLASS = 70
# The figures of one sample set, in the order tables give them; lower is better for all but the paired ones.
FIGURES = ("fd", "kid", "balanced_fd", "mixture_tv", "psnr", "ssim", "agreement")
LOWER_IS_BETTER = {"fd": True, "kid": True, "balanced_fd": True, "mixture_tv": True,
                   "psnr": False, "ssim": False, "agreement": False}


class DigitsReference:
    """The held-out digits at an image size, and the classifier whose features every figure is in."""

    def __init__(self, image_size: int):
        self.images, self.labels = digits("heldout", size=image_size)
        self.classifier = load_digits_classifier()
        from pyevo.features import load_feature_extractor

        self.extractor = load_feature_extractor("digits", None)


def sample_figures(samples: torch.Tensor, teacher_samples: torch.Tensor | None, reference: DigitsReference,
                   seed: int) -> dict[str, float | list[float] | None]:
    """Every figure of ``samples`` (N, 1, S, S) in [-1, 1]; the paired ones against ``teacher_samples``
    (same noise; None for the teacher itself)."""
    distribution = distribution_metrics(samples, reference.images, reference.extractor)
    predicted = reference.classifier.predict(at_digits_size(samples))
    balanced = balanced_index(predicted, BALANCED_PER_CLASS, seed)
    figures = {"fd": distribution["fd"], "kid": distribution["kid_mean"], "kid_subset_std": distribution["kid_std"],
               "balanced_fd": frechet_distance(samples[balanced], reference.images, reference.classifier),
               "mixture_tv": class_mixture_distance(samples, reference.labels, reference.classifier),
               "class_shares": class_coverage(samples, reference.classifier),
               "psnr": None, "ssim": None, "agreement": None}
    if teacher_samples is not None:
        figures.update(psnr=psnr(samples, teacher_samples), ssim=ssim(samples, teacher_samples),
                       agreement=class_agreement(samples, teacher_samples, reference.classifier))
    return figures


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(per_seed: Mapping[str, Mapping], teacher_per_seed: Mapping[str, Mapping] | None) -> dict:
    """``{figure: {"mean", "std", "ratio"}}`` over the seeds both sets have; ``ratio`` is the model's mean
    over the teacher's (unpaired figures only; None for the teacher or a missing teacher figure, and for a
    KID whose mean, the model's or the teacher's, does not stand clear of its spread over the seeds: the
    unbiased estimate of a near-zero KID is noise around zero, often negative)."""
    seeds = sorted(per_seed)
    out = {}
    for figure in FIGURES:
        values = [per_seed[s][figure] for s in seeds if per_seed[s].get(figure) is not None]
        if not values:
            continue
        mean, std = mean_std(values)
        ratio = None
        if teacher_per_seed is not None and LOWER_IS_BETTER[figure]:
            teacher_values = [teacher_per_seed[s][figure] for s in seeds if s in teacher_per_seed]
            if teacher_values and statistics.mean(teacher_values) > 0:
                teacher_mean, teacher_std = mean_std(teacher_values)
                clear = figure != "kid" or (mean > std and teacher_mean > teacher_std)
                ratio = mean / teacher_mean if clear else None
        out[figure] = {"mean": mean, "std": std, "ratio": ratio, "n": len(values)}
    return out
