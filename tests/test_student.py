"""The exported student: inherits the supernet's function, round-trips through diffusers, runs in pipelines."""
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention

from pyevo.cost import count_macs, count_params
from pyevo.space import decode_network, encode_network, unet_space
from pyevo.student import (DroppedAttention, ShortcutOnly, SlimResnetBlock2D, StudentUNet2DModel,
                           build_static_block)
from pyevo.supernet import build_supernet, supernet_unet
from unet_configs import DIGITS_CONFIG


@pytest.fixture(scope="module")
def teacher_and_supernet():
    torch.manual_seed(0)
    teacher = UNet2DModel(**DIGITS_CONFIG).eval().requires_grad_(False)
    supernet = build_supernet(teacher).eval()
    with torch.no_grad():  # move the shared weights away from the teacher, as distillation would
        for param in supernet.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return teacher, supernet


def random_network(supernet, seed):
    rng = random.Random(seed)
    return {name: block.space.random_genome(rng) for name, block in supernet.items()}


def inputs(batch=2):
    generator = torch.Generator().manual_seed(5)
    return torch.randn(batch, 1, 16, 16, generator=generator), torch.tensor([3, 700][:batch])


@pytest.mark.parametrize("seed", [0, 1])
def test_student_computes_the_supernet_path(teacher_and_supernet, seed):
    teacher, supernet = teacher_and_supernet
    network = random_network(supernet, seed)
    supernet.set_genome(network)
    student = StudentUNet2DModel.from_supernet(teacher, supernet, network)
    sample, timestep = inputs()
    with torch.no_grad():
        expected = supernet_unet(teacher, supernet)(sample, timestep).sample
        actual = student(sample, timestep).sample
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert student.network_genome() == network
    assert decode_network(student.config.genome, list(supernet.spaces.values())) == network


def test_static_blocks_match_super_blocks_and_their_cost(teacher_and_supernet):
    teacher, supernet = teacher_and_supernet
    network = random_network(supernet, 2)
    calls = {}
    handles = [block.register_forward_pre_hook(
        lambda module, args, kwargs, name=name: calls.setdefault(name, (args, kwargs)), with_kwargs=True)
        for name, block in supernet.items()]
    supernet.set_genome(network)
    with torch.no_grad():
        supernet_unet(teacher, supernet)(*inputs())
    for handle in handles:
        handle.remove()
    for name, super_block in supernet.items():
        static = build_static_block(super_block, network[name]).eval()
        args, kwargs = calls[name]
        with torch.no_grad():
            expected, actual = super_block(*args, **kwargs), static(*args, **kwargs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = actual if isinstance(actual, tuple) else (actual,)
        for a, e in zip(torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected),
                        strict=True):
            assert (a - e).abs().max() <= 1e-5 * e.abs().max()
        assert not any("Super" in type(m).__name__ for m in static.modules())
        assert count_macs(static, *args, **kwargs) == count_macs(super_block, *args, **kwargs)


def test_static_layers_follow_the_genome(teacher_and_supernet):
    _, supernet = teacher_and_supernet
    space = supernet["down_blocks.1"].space
    genome = space.decode("r0:skip,r1:k1k5w0.5,a0:drop,a1:h2")
    static = build_static_block(supernet["down_blocks.1"], genome)
    assert isinstance(static.resnets[0], ShortcutOnly) and static.resnets[0].conv_shortcut is not None
    slim = static.resnets[1]
    assert isinstance(slim, SlimResnetBlock2D)
    assert slim.conv1.weight.shape == (32, 64, 1, 1) and slim.conv2.weight.shape == (64, 32, 5, 5)
    assert slim.norm2.num_groups == 4 and slim.time_emb_proj.out_features == 32
    assert isinstance(static.attentions[0], DroppedAttention)
    assert isinstance(static.attentions[1], Attention) and static.attentions[1].heads == 2


def test_teacher_genome_student_is_the_teacher(teacher_and_supernet):
    teacher, _ = teacher_and_supernet
    fresh = build_supernet(teacher).eval()
    student = StudentUNet2DModel.from_supernet(teacher, fresh, fresh.network_genome())
    assert count_params(student) == count_params(teacher)
    sample, timestep = inputs()
    with torch.no_grad():
        expected = teacher(sample, timestep).sample
        assert (student(sample, timestep).sample - expected).abs().max() <= 1e-5 * expected.abs().max()
    empty = StudentUNet2DModel.from_config(teacher.config, genome="")  # "" = the teacher's genome
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in teacher.state_dict().items()}


def test_skips_and_drops_cost_less(teacher_and_supernet):
    teacher, supernet = teacher_and_supernet
    spaces = list(supernet.spaces.values())
    network = {space.name: space.canonical((0,) * len(space)) for space in spaces}  # all skipped, all dropped
    student = StudentUNet2DModel.from_supernet(teacher, supernet, encode_network(network, spaces))
    assert not any(isinstance(m, Attention) for m in student.modules())
    sample, timestep = inputs(batch=1)
    assert count_params(student) < count_params(teacher) / 2
    assert count_macs(student, sample, timestep) < count_macs(teacher, sample, timestep) / 2


def test_bad_genome_in_config_raises():
    config = {**DIGITS_CONFIG, "genome": "down_blocks.0=r0:k3k3w1.0"}
    with pytest.raises(ValueError, match="does not give"):
        StudentUNet2DModel(**config)


def test_save_and_load_in_a_fresh_process(teacher_and_supernet, tmp_path):
    teacher, supernet = teacher_and_supernet
    network = random_network(supernet, 3)
    student = StudentUNet2DModel.from_supernet(teacher, supernet, network)
    student.save_pretrained(tmp_path / "student")
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["_class_name"] == "StudentUNet2DModel" and saved["genome"] == student.config.genome
    sample, timestep = inputs()
    torch.save({"sample": sample, "timestep": timestep}, tmp_path / "inputs.pt")
    # CPU kernels split work by thread count, which changes float rounding: use the parent's count
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        from pyevo.student import StudentUNet2DModel
        model = StudentUNet2DModel.from_pretrained({str(tmp_path / "student")!r})
        data = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            torch.save(model(data["sample"], data["timestep"]).sample, {str(tmp_path / "output.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with torch.no_grad():
        expected = student(sample, timestep).sample
    assert torch.equal(torch.load(tmp_path / "output.pt"), expected)


def test_drop_in_unet_for_ddim(teacher_and_supernet):
    teacher, supernet = teacher_and_supernet
    student = StudentUNet2DModel.from_supernet(teacher, supernet, random_network(supernet, 4))
    pipeline = DDIMPipeline(unet=student, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 1)
    assert torch.isfinite(torch.from_numpy(images)).all()


def test_student_space_matches_the_teacher_space(teacher_and_supernet):
    teacher, _ = teacher_and_supernet
    assert [s.name for s in unet_space(teacher)] == list(StudentUNet2DModel(**DIGITS_CONFIG).network_genome())


OTHER_BLOCK_CONFIGS = {
    # score-SDE style: FIR skip blocks (the UNet inspects `skip_conv` on each block), Fourier time embedding
    "skip_blocks": dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        norm_num_groups=8, attention_head_dim=8, time_embedding_type="fourier",
                        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"), mid_block_scale_factor=2 ** -0.5),
    # resnets as samplers (fixed) and scale_shift time embedding; ResnetDown/UpsampleBlock2D; no mid attention
    "resnet_samplers": dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                            layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                            down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), downsample_type="resnet",
                            upsample_type="resnet", resnet_time_scale_shift="scale_shift", add_attention=False),
}


@pytest.mark.parametrize("kind", sorted(OTHER_BLOCK_CONFIGS))
def test_other_diffusers_block_types(kind, tmp_path):
    torch.manual_seed(0)
    teacher = UNet2DModel(**OTHER_BLOCK_CONFIGS[kind]).eval()
    supernet = build_supernet(teacher).eval()
    sample, timestep = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        expected = teacher(sample, timestep).sample
        assert (supernet_unet(teacher, supernet)(sample, timestep).sample - expected).abs().max() \
            <= 1e-5 * expected.abs().max()
        network = random_network(supernet, 0)
        supernet.set_genome(network)
        expected = supernet_unet(teacher, supernet)(sample, timestep).sample
        student = StudentUNet2DModel.from_supernet(teacher, supernet, network)
        actual = student(sample, timestep).sample
        assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()
        student.save_pretrained(tmp_path)
        assert torch.equal(StudentUNet2DModel.from_pretrained(tmp_path)(sample, timestep).sample, actual)
