"""Block-wise distillation, the held-out NSR, and retraining with the dynamic joint loss."""
import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from pyevo.config import DistillConfig, RetrainConfig
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
    calls = heldout_calls(unet, images[:32], scheduler, size=32, seed=1)

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
    result = distill_supernet(unet, supernet, spaces, images, scheduler,
                              DistillConfig(steps=25, batch_size=16, lr=3e-3), seed=0, progress=False)
    after = smallest_nsr()
    assert len(result.history) == 25 and set(result.history[0]) == {"step", *spaces}
    assert sum(after.values()) < 0.8 * sum(before.values())


def test_distillation_is_deterministic(setup):
    unet, scheduler, spaces, images = setup
    states = []
    for _ in range(2):
        supernet = build_supernet(unet)
        distill_supernet(unet, supernet, spaces, images, scheduler, DistillConfig(steps=3, batch_size=8),
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
    history = retrain_student(unet, student, images, scheduler, config, seed=0, progress=False)
    assert [h["lambda"] for h in history][:1] == [1.0] and history[-1]["lambda"] == 0.0
    assert "block_nsr" in history[0] and "block_nsr" not in history[-1]
    first = sum(h["block_nsr"] for h in history[:5]) / 5
    last_with_blocks = [h["block_nsr"] for h in history if "block_nsr" in h][-5:]
    assert sum(last_with_blocks) / 5 < first
    assert not student.training


def test_teacher_target_is_zero_for_the_teacher_shaped_student(setup):
    """With end_target "teacher", a student that is the teacher (teacher genome, fresh supernet)
    starts with an end loss at float32 rounding, and with "noise" it does not."""
    unet, scheduler, spaces, images = setup
    genomes = {name: space.teacher_genome() for name, space in spaces.items()}
    losses = {}
    for target in ("teacher", "noise"):
        student = StudentUNet2DModel.from_supernet(unet, build_supernet(unet), genomes)
        config = RetrainConfig(steps=1, batch_size=8, loss="end-only", end_target=target)
        losses[target] = retrain_student(unet, student, images, scheduler, config, seed=0, progress=False)[0]["end_loss"]
    assert losses["teacher"] < 1e-10 < 1e-3 < losses["noise"]
