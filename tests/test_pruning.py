"""The structural-pruning baselines (pyevo/study/pruning.py): uniform width (L1) and Diff-Pruning (Taylor)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from unet_configs import DDPM_CIFAR10_CONFIG, DIGITS_CONFIG

from pyevo.config import RetrainConfig
from pyevo.data import digits
from pyevo.diffusion import ImageSet, training_target
from pyevo.retrain import retrain_student
from pyevo.sample import sample_images
from pyevo.study.pruning import (accumulate_diffusion_gradients, achievable_shares, batch1_macs, load_pruned,
                                 prune_to_share, prune_unet, save_pruned)
from pyevo.teacher import load_teacher

# DDPM CIFAR-10's shape (4 levels, single-head attention at the second, padding-0 downsampling, freq_shift 1)
# at a width and size a CPU test affords: 8 groups per norm as the digits teacher has, so the channel
# granularity is the digits teacher's (groups of 4 and 8 channels), not one channel per group.
SMALL_CIFAR_CONFIG = {**DDPM_CIFAR10_CONFIG, "sample_size": 16, "block_out_channels": (32, 64, 64, 64),
                      "norm_num_groups": 8}
# Where the digits teacher's loss has fallen to a fifth of its largest within a dozen timesteps (the
# default 0.05 takes 217 at batch 32, a minute on two cores).
FAST_THRESHOLD = 0.2
DIFF_BATCH = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many small ops (torch-pruning's bookkeeping, 16x16 convolutions), where a second
    intra-op thread only adds synchronisation: 10-20x slower on a busy two-core machine. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_teacher():
    return load_teacher("digits")


@pytest.fixture(scope="module")
def digits_data():
    return ImageSet(digits("train", 16)[0])


@pytest.fixture(scope="module")
def small_cifar():
    torch.manual_seed(0)
    return UNet2DModel(**SMALL_CIFAR_CONFIG).eval().requires_grad_(False), DDPMScheduler(num_train_timesteps=1000)


@pytest.fixture(scope="module")
def digits_run(digits_teacher, digits_data):
    """prune_unet on the digits teacher, once per (importance, target) in this module (Diff-Pruning at a
    batch of 4 and FAST_THRESHOLD: a dozen timesteps)."""
    teacher, scheduler = digits_teacher
    runs = {}

    def run(importance, target):
        if (importance, target) not in runs:
            options = dict(batch_size=DIFF_BATCH, threshold=FAST_THRESHOLD) if importance == "diff-pruning" else {}
            runs[importance, target] = prune_unet(teacher, target, importance, digits_data, scheduler, seed=0,
                                                  **options)
        return runs[importance, target]

    return run


@pytest.fixture(scope="module")
def digits_main_steps(digits_teacher):
    """MACs ratios of the digits teacher pruned at k/8 of every group, k = 2..8: the shares at which its
    32- and 64-channel layers (groups of 4 and 8 channels) and its head dims change width together."""
    teacher, _ = digits_teacher
    macs = batch1_macs(teacher)
    return {k / 8: batch1_macs(prune_to_share(teacher, k / 8, "magnitude")) / macs for k in range(2, 9)}


def _probe(channels=1, size=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, size, size, generator=generator), torch.tensor([3, 700])


def _kept(teacher_values: torch.Tensor, pruned_values: torch.Tensor) -> list[int]:
    """The teacher's indices of the pruned values (trained biases: distinct floats, kept bit-exactly)."""
    index = [torch.nonzero(teacher_values == v).flatten().tolist() for v in pruned_values]
    assert all(len(i) == 1 for i in index)
    return [i[0] for i in index]


def test_magnitude_keeps_the_top_group_l1_channels(digits_teacher):
    torch.manual_seed(0)
    teacher, _ = digits_teacher
    pruned = prune_to_share(teacher, 0.5, "magnitude")
    resnets = [name for name, module in teacher.named_modules() if isinstance(module, ResnetBlock2D)]
    assert len(resnets) == 17
    for name in resnets:
        source, kept = teacher.get_submodule(name), pruned.get_submodule(name)
        # The group of conv1's output channels: conv1 writes them (rows), time_emb_proj adds to them (rows),
        # conv2 reads them (columns); torch-pruning's group L1 is the mean of the three, and with norm2's
        # 8 groups every group loses the same positions, ranked by the mean over the groups.
        score = (source.conv1.weight.abs().flatten(1).sum(1) + source.time_emb_proj.weight.abs().sum(1)
                 + source.conv2.weight.abs().transpose(0, 1).flatten(1).sum(1)) / 3
        groups = source.norm2.num_groups
        per_group = len(score) // groups
        top = score.view(groups, per_group).mean(0).topk(per_group // 2).indices
        expected = sorted(g * per_group + int(i) for g in range(groups) for i in top)
        assert kept.conv1.out_channels == len(expected) == len(score) // 2
        assert torch.equal(kept.conv1.bias, source.conv1.bias[expected])
        assert torch.equal(kept.norm2.weight, source.norm2.weight[expected])
        assert torch.equal(kept.time_emb_proj.bias, source.time_emb_proj.bias[expected])
        # conv1's kept input channels are another group's; its kept rows are the teacher's rows, restricted.
        inputs = _kept(source.norm1.bias, kept.norm1.bias)
        assert torch.equal(kept.conv1.weight, source.conv1.weight[expected][:, inputs])


def test_nothing_pruned_reproduces_the_teacher(digits_teacher, digits_data):
    teacher, scheduler = digits_teacher
    sample, timesteps = _probe()
    with torch.no_grad():
        reference = teacher(sample, timesteps).sample
        same = prune_to_share(teacher, 1.0, "magnitude")
        assert torch.equal(same(sample, timesteps).sample, reference)
    model, info = prune_unet(teacher, 1.0, "magnitude", digits_data, scheduler, seed=0)
    assert info["channel_ratio"] == 1.0 and info["macs_ratio"] == 1.0 and info["params_ratio"] == 1.0
    with torch.no_grad():
        assert torch.equal(model(sample, timesteps).sample, reference)


@pytest.mark.parametrize("importance", ["magnitude", "diff-pruning"])
@pytest.mark.parametrize("target", [0.7, 0.5, 0.4, 0.3])
def test_macs_ratio_is_the_nearest_achievable_on_the_digits_teacher(digits_teacher, digits_run, digits_main_steps,
                                                                    target, importance):
    teacher, _ = digits_teacher
    model, info = digits_run(importance, target)
    achieved = batch1_macs(model) / batch1_macs(teacher)
    assert info["importance"] == importance and info["macs_ratio"] == pytest.approx(achieved, abs=1e-12)
    assert info["macs_error"] == pytest.approx(achieved - target)
    below, above = info["macs_ratio_below"], info["macs_ratio_above"]
    assert below <= target < above and achieved in (below, above)
    assert abs(achieved - target) <= min(abs(below - target), abs(above - target))
    # No share at which the wide layers change width comes closer (computed independently of the search).
    assert all(abs(achieved - target) <= abs(ratio - target) + 1e-12 for ratio in digits_main_steps.values())
    # Between 0.26 and 0.70 the digits teacher's achievable ratios are at most 0.215 apart (0.353 -> 0.568,
    # where at a share of 3/4 its groups of 4 and 8 channels and its 16 head dims all gain one), so the
    # nearest is within half of that. (Above 0.704 the next is 1.0: one channel of every group of 4.)
    assert abs(achieved - target) <= 0.108
    assert info["params_ratio"] < 1.0 and 0.0 < info["channel_ratio"] < 1.0
    # The widths depend on the share alone: both importances reach the same MACs.
    if importance == "diff-pruning":
        assert info["macs_ratio"] == digits_run("magnitude", target)[1]["macs_ratio"]


def test_digits_teacher_main_steps(digits_main_steps):
    ratios = list(digits_main_steps.values())
    assert ratios == sorted(ratios) and ratios[-1] == 1.0
    assert digits_main_steps[0.75] - digits_main_steps[0.625] == pytest.approx(0.221, abs=0.005)


def test_macs_ratio_on_a_ddpm_cifar10_shaped_unet(small_cifar):
    teacher, scheduler = small_cifar
    assert any(isinstance(m, Attention) and m.heads == 1 for m in teacher.modules())
    data = ImageSet(torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    model, info = prune_unet(teacher, 0.5, "magnitude", data, scheduler, seed=0)
    achieved = batch1_macs(model) / batch1_macs(teacher)
    assert info["macs_ratio"] == pytest.approx(achieved, abs=1e-12)
    below, above = info["macs_ratio_below"], info["macs_ratio_above"]
    assert below <= 0.5 < above and abs(achieved - 0.5) == min(abs(below - 0.5), abs(above - 0.5))
    assert abs(achieved - 0.5) <= 0.11  # the same groups of 4 and 8 channels as the digits teacher
    sample, timesteps = _probe(channels=3)
    with torch.no_grad():
        assert model(sample, timesteps).sample.shape == sample.shape


def test_pruned_attention_keeps_the_teachers_heads_and_temperature(small_cifar, digits_teacher):
    """A pruned attention layer equals attention computed by hand from the teacher's weights restricted
    to the kept channels, scores scaled by the teacher's 1 / sqrt(head dim)."""
    for teacher in (small_cifar[0], digits_teacher[0]):
        pruned = prune_to_share(teacher, 0.5, "magnitude")
        name = next(n for n, m in teacher.named_modules() if isinstance(m, Attention))
        source, kept = teacher.get_submodule(name), pruned.get_submodule(name)
        assert kept.heads == source.heads
        head_dim, kept_head_dim = source.inner_dim // source.heads, kept.inner_dim // kept.heads
        assert kept_head_dim == head_dim // 2 and kept.scale == kept_head_dim ** -0.5
        channels = _kept(source.to_out[0].bias, kept.to_out[0].bias)  # the residual stream's
        inner = _kept(source.to_v.bias, kept.to_v.bias)
        assert [sum(i // head_dim == h for i in inner) for h in range(source.heads)] == [kept_head_dim] * source.heads
        x = torch.randn(2, len(channels), 4, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            normed = F.group_norm(x, source.group_norm.num_groups, source.group_norm.weight[channels],
                                  source.group_norm.bias[channels], source.group_norm.eps).flatten(2).transpose(1, 2)

            def project(linear, rows, columns):
                return normed @ linear.weight[rows][:, columns].T + linear.bias[rows]

            q, k, v = (project(p, inner, channels).unflatten(-1, (source.heads, kept_head_dim)).transpose(1, 2)
                       for p in (source.to_q, source.to_k, source.to_v))
            scores = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)
            mixed = (scores @ v).transpose(1, 2).flatten(2)
            out = mixed @ source.to_out[0].weight[channels][:, inner].T + source.to_out[0].bias[channels]
            expected = (out.transpose(1, 2).reshape(x.shape) + x) / source.rescale_output_factor
            assert torch.allclose(kept(x), expected, atol=1e-5)


def test_pruned_groupnorms_keep_their_groups(small_cifar, digits_teacher):
    for teacher in (small_cifar[0], digits_teacher[0]):
        pruned = prune_to_share(teacher, 0.3, "magnitude")
        norms = {n: m for n, m in pruned.named_modules() if isinstance(m, nn.GroupNorm)}
        teacher_norms = dict(teacher.named_modules())
        assert norms and all(m.num_groups == teacher_norms[n].num_groups and m.num_channels % m.num_groups == 0
                             and m.num_channels < teacher_norms[n].num_channels for n, m in norms.items())
        # Never pruned: the image channels in and out, the sinusoidal embedding's input.
        assert pruned.conv_in.in_channels == teacher.conv_in.in_channels
        assert pruned.conv_out.out_channels == teacher.conv_out.out_channels
        assert pruned.time_embedding.linear_1.in_features == teacher.time_embedding.linear_1.in_features
        assert pruned.time_embedding.linear_1.out_features < teacher.time_embedding.linear_1.out_features


class _Scaled(nn.Module):
    """A stand-in UNet whose prediction is w x the noisy sample: its epsilon loss is known in closed form."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, sample, timestep, class_labels=None):
        return type("Output", (), {"sample": self.w * sample})()


def test_diff_pruning_accumulates_gradients_until_the_threshold():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    data = ImageSet(torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    model = _Scaled()
    result = accumulate_diffusion_gradients(model, data, scheduler, seed=3, batch_size=5, threshold=0.05)
    # By hand: the same batch and noise (seeded as the function draws them), all 1000 losses at once.
    generator = torch.Generator().manual_seed(3)
    clean = data.images[torch.randperm(len(data), generator=generator)[:5]]
    noise = torch.randn(clean.shape, generator=generator)
    signal = scheduler.alphas_cumprod.sqrt().view(-1, 1, 1, 1, 1)
    spread = (1 - scheduler.alphas_cumprod).sqrt().view(-1, 1, 1, 1, 1)
    noisy = signal * clean + spread * noise  # (1000, 5, 1, 4, 4)
    losses = ((noisy - noise) ** 2).flatten(1).mean(1)
    running_max = losses.cummax(0).values
    stop = int(torch.nonzero(losses < 0.05 * running_max)[0])
    assert 0 < stop < 999  # a proper prefix: the loss falls below 5% of its largest
    assert result["timesteps"] == [0, stop]
    assert result["timestep_losses"] == pytest.approx(losses[:stop + 1].tolist(), rel=1e-5)
    assert result["largest_loss"] == pytest.approx(float(running_max[stop]), rel=1e-5)
    # The gradient is the sum over t = 0..stop (stop included) of d/dw mean((w x - n)^2) at w = 1.
    gradient = (2 * (noisy[:stop + 1] - noise) * noisy[:stop + 1]).flatten(1).mean(1).sum()
    assert float(model.w.grad) == pytest.approx(float(gradient), rel=1e-4)
    # A lower threshold accumulates longer; 0 never stops early.
    assert accumulate_diffusion_gradients(model, data, scheduler, 3, 5, 0.01)["timesteps"][1] > stop
    assert accumulate_diffusion_gradients(model, data, scheduler, 3, 5, 0.0)["timesteps"] == [0, 999]


def test_diff_pruning_on_the_digits_teacher(digits_teacher, digits_data, digits_run):
    teacher, scheduler = digits_teacher
    model, info = digits_run("diff-pruning", 0.5)
    first, last = info["timesteps"]
    losses = info["timestep_losses"]
    assert first == 0 and 0 < last < scheduler.config.num_train_timesteps - 1 and len(losses) == last + 1
    assert losses[-1] < FAST_THRESHOLD * max(losses)
    assert all(loss >= FAST_THRESHOLD * max(losses[:i + 1]) for i, loss in enumerate(losses[:-1]))
    # The same batch through the teacher at the last timestep gives the last loss.
    generator = torch.Generator().manual_seed(0)
    clean = digits_data.images[torch.randperm(len(digits_data), generator=generator)[:DIFF_BATCH]]
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.full((DIFF_BATCH,), last)
    with torch.no_grad():
        prediction = teacher(scheduler.add_noise(clean, noise, timesteps), timesteps).sample
    assert float(F.mse_loss(prediction, training_target(scheduler, clean, noise, timesteps))) == pytest.approx(
        losses[-1], rel=1e-4)
    # The widths are the granularity's (the same as magnitude's), the channels kept are not all the same.
    reference, reference_info = digits_run("magnitude", 0.5)
    assert info["macs_ratio"] == reference_info["macs_ratio"]
    assert info["channel_ratio"] == reference_info["channel_ratio"]
    differing = [name for name, parameter in model.named_parameters()
                 if name.endswith("conv1.bias") and not torch.equal(parameter, reference.get_parameter(name))]
    assert differing


def test_save_load_round_trip_and_the_teacher_untouched(digits_teacher, digits_run, tmp_path):
    teacher, _ = digits_teacher
    model, _ = digits_run("diff-pruning", 0.4)
    digits_run("magnitude", 0.4)
    # Every run of this module pruned copies: the teacher equals a fresh load, frozen, without gradients.
    fresh, _ = load_teacher("digits")
    assert teacher.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(tensor, fresh.state_dict()[name]) for name, tensor in teacher.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(tmp_path / "pruned")
    assert not loaded.training
    sample, timesteps = _probe()
    with torch.no_grad():
        assert torch.equal(loaded(sample, timesteps).sample, model(sample, timesteps).sample)
    assert {n: p.shape for n, p in loaded.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    assert all(getattr(loaded.get_submodule(n), a) == getattr(m, a) for n, m in model.named_modules() if n
               for a in ("channels", "in_channels", "out_channels", "inner_dim", "heads", "scale", "num_channels")
               if hasattr(m, a))


def test_pruned_model_samples_and_retrains(digits_teacher, digits_data, digits_run):
    teacher, scheduler = digits_teacher
    pruned, _ = digits_run("magnitude", 0.5)
    model = copy.deepcopy(pruned)
    images = sample_images(model, scheduler.config, 4, 3, 0, None, progress=False)
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    history = retrain_student(teacher, model, digits_data, scheduler,
                              RetrainConfig(loss="end-only", steps=2, batch_size=4), seed=0, progress=False)
    assert len(history) == 2 and all(math.isfinite(step["loss"]) for step in history)
    assert not torch.equal(model.conv_in.weight, pruned.conv_in.weight)  # it trained


def test_achievable_shares_start_at_one_channel_per_group(digits_teacher):
    shares = achievable_shares(digits_teacher[0])
    assert shares[0] == 0.25 and shares[-1] == 1.0 and shares == sorted(set(shares))
    assert 0.75 in shares and 7 / 8 in shares and 15 / 16 in shares


def test_user_errors(digits_teacher, digits_data):
    teacher, scheduler = digits_teacher
    for target, importance, message in ((0.5, "taylor", "unknown importance"), (0.0, "magnitude", r"\(0, 1\]"),
                                        (1.5, "magnitude", r"\(0, 1\]")):
        with pytest.raises(ValueError, match=message):
            prune_unet(teacher, target, importance, digits_data, scheduler, seed=0)


def test_class_conditional_teacher(tmp_path):
    """A class-conditional UNet2DModel: its label embedding is pruned with the time embedding it adds to."""
    torch.manual_seed(0)
    teacher = UNet2DModel(**DIGITS_CONFIG, num_class_embeds=10).eval().requires_grad_(False)
    pruned = prune_to_share(teacher, 0.5, "magnitude")
    assert pruned.class_embedding.embedding_dim == pruned.time_embedding.linear_2.out_features == 64
    sample, timesteps = _probe()
    labels = torch.tensor([3, 7])
    save_pruned(pruned, tmp_path)
    with torch.no_grad():
        output = pruned(sample, timesteps, class_labels=labels).sample
        assert torch.equal(load_pruned(tmp_path)(sample, timesteps, class_labels=labels).sample, output)
        assert not torch.equal(pruned(sample, timesteps, class_labels=labels.flip(0)).sample, output)
