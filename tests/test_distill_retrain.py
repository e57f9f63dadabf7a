"""Block-wise distillation, the held-out NSR, and retraining with the dynamic joint loss."""
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from pyevo.config import DistillConfig, RetrainConfig
from pyevo.diffusion import ImageSet
from pyevo.distill import block_nsr, distill_supernet, heldout_calls
from pyevo.retrain import block_weight, retrain_student
from pyevo.sample import ddim_sample
from pyevo.space import unet_space
from pyevo.student import StudentUNet2DModel
from pyevo.supernet import build_supernet


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    return unet, DDPMScheduler(num_train_timesteps=100), {s.name: s for s in unet_space(unet)}, images


def test_distillation_lowers_the_smallest_paths_error(setup):
    unet, scheduler, spaces, images = setup
    supernet = build_supernet(unet)
    calls = heldout_calls(unet, ImageSet(images[:32]), scheduler, size=32, seed=1)

    def smallest_nsr():
        values = {}
        for name, block in supernet.items():
            block.set_genome(spaces[name].smallest_genome())
            values[name] = block_nsr(block, calls[name], chunk=10)  # chunks must not change the sum
        return values

    before = smallest_nsr()
    for name, block in supernet.items():  # the teacher-shaped path starts exact
        block.set_genome(spaces[name].teacher_genome())
        assert block_nsr(block, calls[name]) < 1e-10
    result = distill_supernet(unet, supernet, spaces, ImageSet(images), scheduler,
                              DistillConfig(steps=25, batch_size=16, lr=3e-3), seed=0, progress=False)
    after = smallest_nsr()
    assert len(result.history) == 25 and set(result.history[0]) == {"step", *spaces}
    assert sum(after.values()) < 0.8 * sum(before.values())


def test_distillation_is_deterministic(setup):
    unet, scheduler, spaces, images = setup
    states = []
    for _ in range(2):
        supernet = build_supernet(unet)
        distill_supernet(unet, supernet, spaces, ImageSet(images), scheduler, DistillConfig(steps=3, batch_size=8),
                         seed=4, progress=False)
        states.append(supernet.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)


@pytest.mark.parametrize("loss, expected", [
    ("dynamic", [1.0, 0.5 * (1 + math.cos(math.pi * 0.5)), 0.0, 0.0]),
    ("hard", [1.0, 1.0, 0.0, 0.0]),
    ("static", [0.3, 0.3, 0.3, 0.3]),
    ("end-only", [0.0, 0.0, 0.0, 0.0]),
])
def test_block_weight_schedules(loss, expected):
    config = RetrainConfig(loss=loss, lambda_share=0.5, static_lambda=0.3)
    got = [block_weight(step, 100, config) for step in (0, 25, 50, 99)]
    assert got == pytest.approx(expected)


def test_retraining_improves_the_student(setup):
    unet, scheduler, spaces, images = setup
    supernet = build_supernet(unet)
    genomes = {name: space.smallest_genome() for name, space in spaces.items()}
    student = StudentUNet2DModel.from_supernet(unet, supernet, genomes)
    config = RetrainConfig(steps=30, batch_size=16, lr=2e-3, lambda_share=0.5, ema_decay=0.0)
    history = retrain_student(unet, student, ImageSet(images), scheduler, config, seed=0, progress=False)
    assert [h["lambda"] for h in history][:1] == [1.0] and history[-1]["lambda"] == 0.0
    assert "block_nsr" in history[0] and "block_nsr" not in history[-1]
    first = sum(h["block_nsr"] for h in history[:5]) / 5
    last_with_blocks = [h["block_nsr"] for h in history if "block_nsr" in h][-5:]
    assert sum(last_with_blocks) / 5 < first
    assert not student.training


def test_teacher_target_is_zero_for_the_teacher_shaped_student(setup):
    """With end_target "teacher", a student that is the teacher (teacher genome, fresh supernet)
    starts with an end loss at float32 rounding, and with "true" (the noise) it does not."""
    unet, scheduler, spaces, images = setup
    genomes = {name: space.teacher_genome() for name, space in spaces.items()}
    losses = {}
    for target in ("teacher", "true"):
        student = StudentUNet2DModel.from_supernet(unet, build_supernet(unet), genomes)
        config = RetrainConfig(steps=1, batch_size=8, loss="end-only", end_target=target)
        losses[target] = retrain_student(unet, student, ImageSet(images), scheduler, config, seed=0, progress=False)[0]["end_loss"]
    assert losses["teacher"] < 1e-10 < 1e-3 < losses["true"]


def _reference_target(kind: str, scheduler, clean, noise, timesteps):
    """The target of each prediction type from the schedule's alphas, in float64, by hand."""
    alpha_bar = scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1)
    clean, noise = clean.double(), noise.double()
    return {"epsilon": noise, "sample": clean,
            "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean}[kind]


def _first_retrain_batch(student, scheduler, images, seed: int = 5, size: int = 8):
    """The batch retrain_student(seed=5, batch_size=8) draws first (the same generator calls as
    pyevo.diffusion.noisy_batch): the student's float64 output on it, the clean images, noise and timesteps."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(images), (size,), generator=generator)
    noise = torch.randn(images[index].shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (size,), generator=generator)
    with torch.no_grad():
        output = student(scheduler.add_noise(images[index], noise, timesteps), timesteps).sample.double()
    return output, images[index], noise, timesteps


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_end_loss_uses_the_teachers_prediction_type(setup, kind):
    """retrain's first end loss is the MSE of the student's output against the true target of the
    teacher's prediction type (velocity for v_prediction), reproduced from the same generator."""
    unet, _, spaces, images = setup
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=kind)
    genomes = {name: space.teacher_genome() for name, space in spaces.items()}
    student = StudentUNet2DModel.from_supernet(unet, build_supernet(unet), genomes)
    config = RetrainConfig(steps=1, batch_size=8, loss="end-only", end_target="true")
    output, clean, noise, timesteps = _first_retrain_batch(student, scheduler, images)
    expected = F.mse_loss(output, _reference_target(kind, scheduler, clean, noise, timesteps)).item()
    got = retrain_student(unet, student, ImageSet(images), scheduler, config, seed=5, progress=False)[0]["end_loss"]
    assert got == pytest.approx(expected, rel=1e-5)
    others = [F.mse_loss(output, _reference_target(k, scheduler, clean, noise, timesteps)).item()
              for k in ("epsilon", "v_prediction", "sample") if k != kind]
    assert all(abs(other - got) > 1e-3 * got for other in others)  # the types are told apart


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_each_samples_end_loss_by_its_timestep(setup, kind):
    """With retrain.snr_gamma, the first end loss is the mean of each sample's MSE times its Min-SNR-gamma
    weight, by hand from the schedule's alphas in float64 (Hang et al.: min(SNR, g) / SNR for epsilon,
    / (SNR + 1) for v_prediction, min(SNR, g) for sample)."""
    unet, _, spaces, images = setup
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=kind)
    genomes = {name: space.teacher_genome() for name, space in spaces.items()}
    student = StudentUNet2DModel.from_supernet(unet, build_supernet(unet), genomes)
    gamma = 2.0
    config = RetrainConfig(steps=1, batch_size=8, loss="end-only", end_target="true", snr_gamma=gamma)
    output, clean, noise, timesteps = _first_retrain_batch(student, scheduler, images)
    per_sample = ((output - _reference_target(kind, scheduler, clean, noise, timesteps)) ** 2).flatten(1).mean(1)
    alpha_bar = scheduler.alphas_cumprod.double()[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    weight = {"epsilon": snr.clamp(max=gamma) / snr, "v_prediction": snr.clamp(max=gamma) / (snr + 1),
              "sample": snr.clamp(max=gamma)}[kind]
    assert not torch.allclose(weight, torch.ones_like(weight))  # the draw spans both sides of gamma
    got = retrain_student(unet, student, ImageSet(images), scheduler, config, seed=5, progress=False)[0]["end_loss"]
    assert got == pytest.approx(float((per_sample * weight).mean()), rel=1e-5)
    assert got != pytest.approx(float(per_sample.mean()), rel=1e-3)


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_the_sampler_reads_the_output_as_the_prediction_type(setup, kind):
    """ddim_sample against a hand-written deterministic DDIM loop that converts the UNet's output
    (v or x0) to x0 and epsilon from the schedule's alphas."""
    unet = setup[0]
    config = dict(DDPMScheduler(num_train_timesteps=100, prediction_type=kind).config)
    got = ddim_sample(unet, config, n=3, steps=4, seed=2, progress=False)
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(4)
    alpha_bar = ddim.alphas_cumprod.double()
    x = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(2)).double()
    for t in ddim.timesteps:
        with torch.no_grad():
            out = unet(x.float(), t).sample.double()
        a, prev = alpha_bar[t], int(t) - 100 // 4
        a_prev = alpha_bar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        if kind == "v_prediction":
            x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
        else:
            x0, eps = out, (x - a.sqrt() * out) / (1 - a).sqrt()
        x = a_prev.sqrt() * x0.clamp(-1, 1) + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(got.double(), x.clamp(-1, 1), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def conditional():
    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8, num_class_embeds=3,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    data = ImageSet(torch.rand(48, 1, 8, 8) * 2 - 1, torch.arange(48) % 3)
    return unet, DDPMScheduler(num_train_timesteps=100), {s.name: s for s in unet_space(unet)}, data


def test_labels_flow_through_capture_distillation_and_retraining(conditional):
    unet, scheduler, spaces, data = conditional
    calls = heldout_calls(unet, data, scheduler, size=12, seed=0)
    supernet = build_supernet(unet)
    for name, block in supernet.items():  # the teacher-shaped path replays the labelled teacher exactly
        block.set_genome(spaces[name].teacher_genome())
        assert block_nsr(block, calls[name]) < 1e-10
    # The labels change what the blocks see (through temb), so the recorded calls depend on them.
    relabelled = heldout_calls(unet, ImageSet(data.images, (data.labels + 1) % 3), scheduler, size=12, seed=0)
    name = next(iter(calls))
    assert not torch.allclose(calls[name].output[0], relabelled[name].output[0])
    distill_supernet(unet, supernet, spaces, data, scheduler, DistillConfig(steps=2, batch_size=8), seed=0,
                     progress=False)
    genomes = {name: space.teacher_genome() for name, space in spaces.items()}
    student = StudentUNet2DModel.from_supernet(unet, build_supernet(unet), genomes)
    config = RetrainConfig(steps=1, batch_size=8, loss="end-only", end_target="teacher")
    # A teacher-shaped student given the labels matches the labelled teacher: zero end loss.
    assert retrain_student(unet, student, data, scheduler, config, seed=0, progress=False)[0]["end_loss"] < 1e-10
    samples = ddim_sample(student, dict(scheduler.config), n=4, steps=2, seed=0, progress=False,
                          class_labels=torch.tensor([0, 1, 2, 0]))
    assert samples.shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="class_labels are needed"):
        ddim_sample(student, dict(scheduler.config), n=4, steps=2, progress=False)


def test_checkpointing_computes_the_same_training(setup):
    """Activation checkpointing recomputes activations; the trained weights must not change."""
    unet, scheduler, spaces, images = setup
    states = []
    for checkpointing in (False, True):
        supernet = build_supernet(unet)
        distill_supernet(unet, supernet, spaces, ImageSet(images), scheduler,
                         DistillConfig(steps=2, batch_size=8, checkpointing=checkpointing), seed=3, progress=False)
        student = StudentUNet2DModel.from_supernet(unet, supernet,
                                                   {name: space.teacher_genome() for name, space in spaces.items()})
        retrain_student(unet, student, ImageSet(images), scheduler,
                        RetrainConfig(steps=2, batch_size=8, ema_decay=0.0, checkpointing=checkpointing),
                        seed=3, progress=False)
        states.append((supernet.state_dict(), student.state_dict()))
    for plain, checkpointed in zip(*states):
        for key in plain:
            torch.testing.assert_close(plain[key], checkpointed[key], rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_trains_close_to_float32(setup):
    unet, scheduler, spaces, images = setup
    histories = {}
    for dtype in (torch.float32, torch.bfloat16):
        supernet = build_supernet(unet)
        histories[dtype] = distill_supernet(unet, supernet, spaces, ImageSet(images), scheduler,
                                            DistillConfig(steps=2, batch_size=8), seed=3, progress=False,
                                            train_dtype=dtype).history
    for name in spaces:
        full, half = histories[torch.float32][0][name], histories[torch.bfloat16][0][name]
        assert math.isfinite(half) and half != full and half == pytest.approx(full, rel=0.1)


def test_a_teacher_that_outputs_nan_stops_distillation_and_retraining_naming_its_timesteps(setup):
    import copy

    from pyevo.training import NonFiniteError

    unet, scheduler, spaces, images = setup
    broken = copy.deepcopy(unet)
    with torch.no_grad():
        broken.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"distill step 0: the teacher's own prediction is not finite at timestep"):
        distill_supernet(broken, build_supernet(unet), spaces, ImageSet(images), scheduler,
                         DistillConfig(steps=2, batch_size=4), seed=0, progress=False)
    student = StudentUNet2DModel.from_supernet(unet, build_supernet(unet), {n: s.teacher_genome() for n, s in spaces.items()})
    with pytest.raises(NonFiniteError, match=r"retrain step 0: the teacher's own prediction"):
        retrain_student(broken, student, ImageSet(images), scheduler, RetrainConfig(steps=2, batch_size=4), seed=0,
                        progress=False)


def test_a_diverged_block_stops_distillation_naming_the_block_and_step(setup):
    from pyevo.training import NonFiniteError

    unet, scheduler, spaces, images = setup
    supernet = build_supernet(unet)
    name = next(iter(supernet))
    with torch.no_grad():
        next(supernet[name].parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=rf"distill step 0, block {name}, path .*: the block loss is (nan|inf)"):
        distill_supernet(unet, supernet, spaces, ImageSet(images), scheduler, DistillConfig(steps=2, batch_size=4),
                         seed=0, progress=False)


@pytest.mark.parametrize("teacher_path", [False, True])
def test_the_sandwich_takes_the_teacher_shaped_path_only_when_asked(setup, teacher_path, monkeypatch):
    """``distill.teacher_path`` adds the teacher-shaped genome to every block's paths of every step (the
    distillation ablation); without it the paths are the largest, the smallest and the random ones."""
    from pyevo.supernet import SuperBlock

    unet, scheduler, spaces, images = setup
    supernet = build_supernet(unet)
    seen = []
    original = SuperBlock.set_genome

    def recording(self, genome):
        seen.append((self.space.name, tuple(genome)))
        return original(self, genome)

    monkeypatch.setattr(SuperBlock, "set_genome", recording)
    distill_supernet(unet, supernet, spaces, ImageSet(images), scheduler,
                     DistillConfig(steps=2, batch_size=8, random_paths=0, teacher_path=teacher_path), seed=0,
                     progress=False)
    for name, space in spaces.items():
        paths = [genome for block, genome in seen if block == name]
        expected = [space.largest_genome(), space.smallest_genome()] + ([space.teacher_genome()] if teacher_path else [])
        assert paths == expected * 2
