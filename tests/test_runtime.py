"""The lean runtime (pyevo.runtime): outputs equal to the wrapped diffusers model's, fused resnets equal to
diffusers' own in float64, a drop-in unet for diffusers pipelines, the wrapped model left unchanged; on CUDA,
replayed graphs equal to eager calls."""
from __future__ import annotations

import random

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.models.resnet import ResnetBlock2D

import pyevo
from pyevo.runtime import LeanUNet, fused_resnets, optimize
from pyevo.space import encode_network
from pyevo.student import SlimResnetBlock2D, StudentUNet2DModel
from pyevo.supernet import build_supernet
from unet_configs import DIGITS_CONFIG, SD15_SMALL_CONFIG

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def perturbed(unet):
    """Random-init weights with norms away from (1, 0), so that a wrong GroupNorm shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return unet.eval().requires_grad_(False)


def random_student(teacher, seed):
    supernet = build_supernet(teacher).eval()
    rng = random.Random(seed)
    spaces = list(supernet.spaces.values())
    genomes = {space.name: space.random_genome(rng) for space in spaces}
    return StudentUNet2DModel.from_supernet(teacher, supernet, encode_network(genomes, spaces)).eval()


@pytest.mark.parametrize("time_embedding_norm", ["default", "scale_shift"])
def test_fused_resnets_equal_diffusers_in_float64(time_embedding_norm):
    teacher = perturbed(UNet2DModel(**{**DIGITS_CONFIG, "resnet_time_scale_shift": time_embedding_norm}))
    student = random_student(teacher, seed=1)
    sample, timestep = torch.randn(3, 1, 16, 16, dtype=torch.float64), torch.tensor([10, 500, 999])
    for unet, kind in ((teacher.double(), ResnetBlock2D), (student.double(), SlimResnetBlock2D)):
        expected = unet(sample, timestep).sample
        with fused_resnets(unet) as switched:
            assert switched == sum(type(m) is kind for m in unet.modules()) > 0
            actual = unet(sample, timestep).sample
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
        # Back to diffusers' own forwards on exit.
        assert not any("forward" in m.__dict__ for m in unet.modules())


def test_fused_resnets_run_each_convolution_with_its_epilogue_in_one_op():
    """Every resnet's conv1 (with the time embedding) and conv2 (with the shortcut and the output scale) is
    one pyevo::fused_conv2d call under fused_resnets, on the teacher and on a student whose kernels vary."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    teacher = perturbed(UNet2DModel(**{**DIGITS_CONFIG, "resnet_time_scale_shift": "default"}))
    student = random_student(teacher, seed=3)
    sample, timestep = torch.randn(2, 1, 16, 16), torch.tensor([10, 700])
    for unet, kind in ((teacher, ResnetBlock2D), (student, SlimResnetBlock2D)):
        resnets = sum(type(m) is kind for m in unet.modules())
        with torch.no_grad(), fused_resnets(unet), CountOps() as ops:
            unet(sample, timestep)
        assert ops.counts.get("fused_conv2d") == 2 * resnets > 0
        # No convolution of a resnet runs apart from its epilogue: the ones left are conv_in, conv_out,
        # the shortcuts and the down/upsamplers.
        with torch.no_grad(), CountOps() as plain:
            unet(sample, timestep)
        assert ops.counts.get("convolution", 0) == plain.counts["convolution"] - 2 * resnets


def test_lean_unet_forced_fused_matches_the_model():
    teacher = perturbed(UNet2DModel(**DIGITS_CONFIG))
    lean = LeanUNet(teacher, cuda_graph=False, fused=True)
    sample = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = teacher(sample, 300).sample
        out = lean(sample, 300)
        torch.testing.assert_close(out.sample, expected, rtol=1e-5, atol=1e-5)
        assert type(out).__name__ == "UNet2DOutput"
        assert lean(sample, 300, return_dict=False)[0].shape == expected.shape


def test_optimize_on_the_cpu_runs_the_model_as_it_is():
    teacher = perturbed(UNet2DModel(**DIGITS_CONFIG))
    lean = pyevo.optimize(teacher)
    assert isinstance(lean, LeanUNet) and lean.unet is teacher  # no copy where nothing changes
    assert not lean.fused and not lean.cuda_graph  # measured slower / no graphs on the CPU
    assert lean.config is teacher.config and lean.dtype == torch.float32
    sample = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(lean(sample, torch.tensor(7)).sample, teacher(sample, torch.tensor(7)).sample)


def test_optimize_casts_a_copy():
    teacher = perturbed(UNet2DModel(**DIGITS_CONFIG))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    lean = optimize(teacher, dtype="bfloat16")
    assert lean.unet is not teacher and lean.dtype == torch.bfloat16
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the caller's model as it was
    assert teacher.dtype == torch.float32


def test_a_drop_in_unet_for_a_diffusers_pipeline():
    teacher = perturbed(UNet2DModel(**DIGITS_CONFIG))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    images = {}
    for name, unet in (("plain", teacher), ("lean", LeanUNet(teacher, cuda_graph=False, fused=True))):
        pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
        pipeline.set_progress_bar_config(disable=True)
        images[name] = pipeline(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                                output_type="np").images
    assert images["plain"].shape == (2, 16, 16, 1)
    assert abs(images["lean"] - images["plain"]).max() < 1e-4


def test_text_conditional_unet_under_the_runtime():
    unet = perturbed(UNet2DConditionModel(**SD15_SMALL_CONFIG))
    lean = LeanUNet(unet, cuda_graph=False, fused=True)
    sample, states = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = unet(sample, 50, encoder_hidden_states=states).sample
        out = lean(sample, 50, encoder_hidden_states=states)
    assert type(out).__name__ == "UNet2DConditionOutput"
    torch.testing.assert_close(out.sample, expected, rtol=1e-5, atol=1e-5)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_replay_equals_eager(dtype):
    teacher = perturbed(UNet2DModel(**DIGITS_CONFIG))
    lean = optimize(teacher, dtype=dtype, device="cuda")
    assert lean.fused and lean.cuda_graph
    eager = teacher.to("cuda", dtype)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        for batch in (2, 4):  # a new shape: a new graph
            for step in (999, 10):  # a new timestep: the same graph
                sample = torch.randn(batch, 1, 16, 16, device="cuda", dtype=dtype)
                out = lean(sample, step).sample
                torch.testing.assert_close(out, eager(sample, step).sample, rtol=tolerance, atol=tolerance)
    assert len(lean._graphs) == 2
