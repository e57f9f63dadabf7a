"""Fréchet distance, class coverage, PSNR and SSIM against reference computations."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pyevo.classifier import load_digits_classifier
from pyevo.data import digits
from pyevo.metrics import ClassifierFeatures, class_coverage, class_mixture_distance, distribution_metrics, frechet_distance, psnr, ssim


@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier()


def _random_images(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand((n, 1, 16, 16), generator=gen) * 2 - 1) * scale


def _reference_fd(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_fd_of_a_set_with_itself_is_zero(classifier):
    heldout, _ = digits("heldout")
    assert abs(frechet_distance(heldout, heldout, classifier)) < 1e-6


def test_fd_matches_scipy_reference(classifier):
    a = _random_images(300, seed=1)
    b = _random_images(400, seed=2, scale=0.5)
    features = ClassifierFeatures(classifier)
    feats_a, feats_b = features(a), features(b)
    assert feats_a.dtype == torch.float64 and feats_a.shape == (300, 64)
    expected = _reference_fd(feats_a.numpy(), feats_b.numpy())
    got = frechet_distance(a, b, classifier, batch_size=128)  # several update() calls per set
    assert expected > 1.0
    assert got == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a, classifier) == pytest.approx(expected, rel=1e-6)


def test_distribution_metrics_in_the_digits_space(classifier):
    train, _ = digits("train")
    heldout, _ = digits("heldout")
    features = ClassifierFeatures(classifier)
    expected = _reference_fd(features(train[:500]).numpy(), features(heldout).numpy())
    got = distribution_metrics(train[:500], heldout, features, batch_size=128, kid_subsets=10)
    assert got["fd"] == pytest.approx(expected, rel=1e-6)
    assert got["fd"] == pytest.approx(frechet_distance(train[:500], heldout, classifier), rel=1e-9)
    noise = distribution_metrics(_random_images(500, seed=3), heldout, features, kid_subsets=10)
    assert noise["kid_mean"] > 20 * max(got["kid_mean"], 0.0) and noise["kid_mean"] > 10 * noise["kid_std"]


def test_fd_separates_real_from_noise(classifier):
    train, _ = digits("train")
    heldout, _ = digits("heldout")
    real_vs_real = frechet_distance(train[:500], heldout, classifier)
    noise_vs_real = frechet_distance(_random_images(500, seed=3), heldout, classifier)
    assert noise_vs_real > 20 * real_vs_real


def test_features_ignore_train_mode(classifier):
    features = ClassifierFeatures(classifier)
    features.train()
    assert not classifier.training
    x = _random_images(8, seed=4)
    assert torch.equal(features(x), features(x))


def test_class_coverage(classifier):
    heldout, labels = digits("heldout")
    shares = class_coverage(heldout, classifier)
    assert len(shares) == 10 and sum(shares) == pytest.approx(1.0)
    true_shares = (torch.bincount(labels, minlength=10).double() / len(labels)).tolist()
    assert shares == pytest.approx(true_shares, abs=0.01)  # the classifier is ~99% accurate
    ones = heldout[labels == 1]
    assert class_coverage(ones, classifier)[1] > 0.95


def test_class_mixture_distance_is_the_total_variation_of_the_shares(classifier):
    heldout, labels = digits("heldout")
    shares = np.array(class_coverage(heldout, classifier))
    true = np.bincount(labels.numpy(), minlength=10) / len(labels)
    assert class_mixture_distance(heldout, labels, classifier) == pytest.approx(0.5 * np.abs(shares - true).sum())
    assert class_mixture_distance(heldout, labels, classifier) < 0.01  # the classifier is ~99% accurate
    # only ones against the held-out mixture: all the mass outside class 1 is misplaced
    ones = heldout[labels == 1]
    one_shares = np.array(class_coverage(ones, classifier))
    expected = 0.5 * np.abs(one_shares - true).sum()
    assert class_mixture_distance(ones, labels, classifier) == pytest.approx(expected)
    assert expected > 1 - true[1] - 0.05


def test_psnr_ssim_identical_sets():
    a = _random_images(6, seed=5)
    assert psnr(a, a.clone()) == math.inf
    assert ssim(a, a.clone()) == pytest.approx(1.0)


def test_psnr_matches_hand_computation():
    a = _random_images(5, seed=6)
    b = (a + 0.1 * _random_images(5, seed=7)).clamp(-1, 1)
    mse = ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3))
    expected = (10 * torch.log10(4.0 / mse)).mean().item()  # peak-to-peak range of [-1, 1] is 2
    assert psnr(a, b) == pytest.approx(expected, rel=1e-6)  # torchmetrics takes log(10) in float32


def test_ssim_decreases_with_noise():
    a = _random_images(6, seed=8)
    slightly = ssim(a, (a + 0.05 * _random_images(6, seed=9)).clamp(-1, 1))
    heavily = ssim(a, (a + 0.5 * _random_images(6, seed=9)).clamp(-1, 1))
    assert 1.0 > slightly > heavily


def test_bad_shapes(classifier):
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        frechet_distance(torch.zeros(4, 3, 16, 16), torch.zeros(4, 1, 16, 16), classifier)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 1, 16, 16), torch.zeros(4, 1, 16, 16), classifier)
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(2, 1, 16, 16), torch.zeros(3, 1, 16, 16))


def test_class_agreement_counts_pairs_in_the_same_class():
    from pyevo.metrics import class_agreement

    images, labels = digits("heldout")
    order = torch.argsort(labels, stable=True)
    a = images[order][:100]  # mostly 0s and 1s, sorted by class
    assert class_agreement(a, a.clone()) == 1.0
    # Pair each image with one of another class: the classifier (99.8% held-out) must disagree.
    other = images[order][-100:]
    assert class_agreement(a, other) <= 0.02
    with pytest.raises(ValueError, match="same shape"):
        class_agreement(a, a[:10])
