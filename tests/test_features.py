"""Feature extractors (pyevo.features) and FD / KID in any feature space against float64 references.

Nothing here touches the network: Inception is only built from local files, and the download
is replaced by one that fails as it would offline.
"""
import importlib.util
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn

from pyevo.features import (
    FEATURE_KINDS,
    FeatureUnavailable,
    InceptionFeatures,
    extract_features,
    load_feature_extractor,
)
from pyevo.metrics import distribution_metrics
from test_metrics import _reference_fd  # means, covariances and scipy.linalg.sqrtm, in float64

HAVE_TORCH_FIDELITY = importlib.util.find_spec("torch_fidelity") is not None


class RandomConvFeatures(nn.Module):
    """A fixed-seed random conv net with global pooling, run in float64 so batching cannot change it."""

    def __init__(self, in_channels: int = 3, num_features: int = 12, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(in_channels, 16, 3, stride=2, padding=1), nn.Tanh(),
                nn.Conv2d(16, num_features, 3, stride=2, padding=1), nn.Tanh(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            ).double()
        self.num_features = num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.double())


@pytest.fixture(scope="module")
def extractor():
    return RandomConvFeatures()


def _images(n: int, seed: int, channels: int = 3, size: int = 32, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return ((torch.rand((n, channels, size, size), generator=gen) * 2 - 1) * 0.8 + shift).clamp(-1, 1)


def _reference_kid(feats_x: np.ndarray, feats_y: np.ndarray) -> float:
    """Unbiased MMD² with k(x, y) = (x·y / d + 1)³, summed term by term."""
    m, n, d = len(feats_x), len(feats_y), feats_x.shape[1]

    def kernel(a: np.ndarray, b: np.ndarray) -> float:
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    xx = sum(kernel(feats_x[i], feats_x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(feats_y[i], feats_y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(kernel(feats_x[i], feats_y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def _single_line(exc: Exception) -> str:
    message = str(exc)
    assert message and "\n" not in message and "\r" not in message
    return message


def test_fd_and_kid_match_float64_references(extractor):
    samples = _images(120, seed=1)
    reference = _images(120, seed=2, shift=0.2)
    feats_s, feats_r = extractor(samples).numpy(), extractor(reference).numpy()
    expected_fd = _reference_fd(feats_s, feats_r)
    expected_kid = _reference_kid(feats_s, feats_r)
    assert expected_fd > 1e-3 and expected_kid > 1e-4  # the shift is visible in this feature space
    # Several batches per set; one KID subset of the whole set, so no randomness is left.
    got = distribution_metrics(samples, reference, extractor, batch_size=50, kid_subset_size=120)
    assert got["fd"] == pytest.approx(expected_fd, rel=1e-9)
    assert got["kid_mean"] == pytest.approx(expected_kid, rel=1e-9)
    assert abs(got["kid_std"]) < 1e-12  # every subset is the whole set
    assert all(isinstance(value, float) for value in got.values())


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_a_shift(extractor):
    images = _images(200, seed=3)
    same = distribution_metrics(images, images, extractor)
    assert abs(same["fd"]) < 1e-10
    other_draw = distribution_metrics(_images(200, seed=4), images, extractor)["fd"]
    shifted = [distribution_metrics(_images(200, seed=4, shift=s), images, extractor)["fd"] for s in (0.1, 0.3)]
    assert other_draw < shifted[0] < shifted[1]
    assert shifted[1] > 10 * other_draw


def test_kid_on_subsets_is_seeded_and_spread(extractor):
    samples, reference = _images(60, seed=5), _images(80, seed=6, shift=0.1)
    first = distribution_metrics(samples, reference, extractor, kid_subset_size=30)
    torch.manual_seed(123)  # the caller's random state must not matter
    again = distribution_metrics(samples, reference, extractor, kid_subset_size=30)
    assert first == again
    assert first["kid_std"] > 0  # distinct subsets give distinct estimates
    reseeded = distribution_metrics(samples, reference, extractor, kid_subset_size=30, kid_seed=1)
    assert reseeded["kid_mean"] != first["kid_mean"] and reseeded["fd"] == first["fd"]
    # The default subset size is capped by the smaller set.
    default = distribution_metrics(samples, reference, extractor)
    one_subset = distribution_metrics(samples, reference, extractor, kid_subset_size=60)
    assert default == one_subset


def test_distribution_metrics_reject_bad_input(extractor):
    images = _images(10, seed=7)
    with pytest.raises(ValueError, match="between 2 and the smaller set size"):
        distribution_metrics(images, images[:5], extractor, kid_subset_size=6)
    with pytest.raises(ValueError, match="at least 2 images"):
        distribution_metrics(images[:1], images, extractor)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        distribution_metrics(images[0], images, extractor)
    with pytest.raises(ValueError, match="none"):
        distribution_metrics(images, images, None)


def test_extract_features_batches_and_casts(extractor):
    images = _images(25, seed=8)
    whole = extractor(images)
    batched = extract_features(images, extractor, batch_size=7)
    assert batched.dtype == torch.float64 and batched.shape == (25, extractor.num_features)
    assert torch.allclose(batched, whole, rtol=0, atol=1e-12)


def test_load_feature_extractor_kinds():
    assert FEATURE_KINDS == ("inception", "digits", "none")
    assert load_feature_extractor("none") is None
    with pytest.raises(ValueError, match="inception, digits, none"):
        load_feature_extractor("clip")


def test_digits_extractor_takes_16x16_digits_only():
    digits_features = load_feature_extractor("digits")
    assert digits_features.num_features == 64
    features = digits_features(_images(4, seed=9, channels=1, size=16))
    assert features.dtype == torch.float64 and features.shape == (4, 64)
    with pytest.raises(ValueError, match=r"digits feature space takes images of shape \(N, 1, 16, 16\), got \(6, 3, 32, 32\)"):
        distribution_metrics(_images(6, seed=10), _images(6, seed=11), digits_features)


class _RecordingInception(nn.Module):
    """Stands in for NoTrainInceptionV3: checks its input contract and records what it got."""

    def __init__(self):
        super().__init__()
        self.seen = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen = images
        return images.float().mean(dim=(2, 3)).repeat(1, 2048 // 3 + 1)[:, :2048]


def test_inception_wrapper_feeds_uint8_rgb():
    recorder = _RecordingInception()
    wrapper = InceptionFeatures(recorder)
    assert wrapper.num_features == 2048
    grey = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5]).reshape(1, 1, 2, 3)
    features = wrapper(grey)
    assert features.dtype == torch.float64 and features.shape == (1, 2048)
    assert recorder.seen.dtype == torch.uint8 and recorder.seen.shape == (1, 3, 2, 3)
    expected_levels = torch.tensor([0, 64, 128, 191, 255, 255], dtype=torch.uint8).reshape(2, 3)  # round((x + 1) * 127.5)
    for channel in range(3):
        assert torch.equal(recorder.seen[0, channel], expected_levels)
    rgb = _images(2, seed=12, size=7)
    wrapper(rgb)
    assert recorder.seen.shape == (2, 3, 7, 7)
    for bad in (torch.zeros(2, 2, 8, 8), torch.zeros(3, 8, 8)):
        with pytest.raises(ValueError, match=r"inception feature space takes images of shape \(N, C in \{1, 3\}, H, W\)"):
            wrapper(bad)


def _fail_offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_inception_unavailable_without_weights(monkeypatch):
    expected_reason = "torch-fidelity"
    if HAVE_TORCH_FIDELITY:
        try:
            import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
        except ImportError:  # torch-fidelity without torchvision: the loader must say so
            expected_reason = "torchvision"
        else:
            monkeypatch.setattr(fidelity_inception, "load_state_dict_from_url", _fail_offline)
            expected_reason = "URLError"
    with pytest.raises(FeatureUnavailable) as info:
        load_feature_extractor("inception")
    message = _single_line(info.value)
    assert expected_reason in message
    assert "weights file" in message or "digits or none" in message  # it says what to do


def test_inception_unavailable_with_a_missing_or_garbage_weights_file(tmp_path):
    missing = tmp_path / "no-such-inception.pth"
    with pytest.raises(FeatureUnavailable) as info:
        load_feature_extractor("inception", weights=missing)
    assert "not found" in _single_line(info.value) and str(missing) in str(info.value)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file\n" * 10)
    with pytest.raises(FeatureUnavailable) as info:
        load_feature_extractor("inception", weights=str(garbage))
    assert "cannot read" in _single_line(info.value)

    wrong_model = tmp_path / "wrong-model.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong_model)
    with pytest.raises(FeatureUnavailable) as info:
        load_feature_extractor("inception", weights=wrong_model)
    _single_line(info.value)


@pytest.mark.skipif(not HAVE_TORCH_FIDELITY, reason="torch-fidelity is not installed")
def test_inception_from_a_local_weights_file(tmp_path, monkeypatch):
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
    except ImportError as exc:
        pytest.skip(f"torch-fidelity does not import here: {exc}")

    class RandomInception(fidelity_inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the random initialisation
            return None

    monkeypatch.setattr(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
    torch.manual_seed(0)
    weights = tmp_path / "random-inception.pth"
    torch.save(RandomInception("inception-v3-compat", ["2048"]).state_dict(), weights)
    monkeypatch.setattr(fidelity_inception, "load_state_dict_from_url", _fail_offline)

    inception = load_feature_extractor("inception", weights=weights)
    # FD/KID on these features is the path tested above; on 2048-d features torchmetrics' FD alone
    # takes a minute on two cores, so only the extractor is checked here.
    grey, rgb = _images(3, seed=13, channels=1, size=16), _images(2, seed=14, size=40)
    features = inception(grey)
    assert features.dtype == torch.float64 and features.shape == (3, inception.num_features) == (3, 2048)
    assert torch.equal(inception(grey.expand(-1, 3, -1, -1)), features)  # grey is repeated to RGB
    assert inception(rgb).shape == (2, 2048) and torch.isfinite(features).all()
