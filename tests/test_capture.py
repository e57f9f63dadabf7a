"""The teacher stage: loading local folders, recording block inputs/outputs, NSR."""
import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from pyevo.space import searchable_blocks, unet_space
from pyevo.student import StudentUNet2DModel
from pyevo.supernet import build_supernet
from pyevo.teacher import TeacherError, load_teacher, noise_to_signal, output_tensors, record_blocks


def small_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).eval()


def test_recorded_calls_replay_each_block_exactly():
    unet = small_unet()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 500, 999])
    calls, prediction = record_blocks(unet, x, t)
    assert list(calls) == list(searchable_blocks(unet))
    torch.testing.assert_close(prediction, unet(x, t).sample, rtol=0, atol=0)
    for name, block in searchable_blocks(unet).items():
        call = calls[name]
        with torch.no_grad():
            again = block(*call.args, **call.kwargs)
        # Equal up to float32 rounding: the recorded inputs are made contiguous, which can change
        # the convolution's summation order.
        for a, b in zip(output_tensors(again), output_tensors(call.output)):
            torch.testing.assert_close(a, b)
        assert float(noise_to_signal(again, call.output)) < 1e-10
        for tensor in output_tensors((call.args, tuple(call.kwargs.values()))):
            assert tensor.is_contiguous() and not tensor.requires_grad


def test_student_blocks_train_on_recorded_inputs():
    """A skipped first resnet hands the recorded input (no grad) straight to the next GroupNorm:
    the backward must work (torch 2.13's CPU GroupNorm backward crashes on channels-last there)."""
    unet = small_unet()
    spaces = {s.name: s for s in unet_space(unet)}
    genomes = {name: space.canonical((0,) * len(space.num_choices)) for name, space in spaces.items()}
    genomes["down_blocks.2"] = spaces["down_blocks.2"].teacher_genome()
    student = StudentUNet2DModel.from_supernet(unet, build_supernet(unet), genomes).train()
    calls, _ = record_blocks(unet, torch.randn(8, 1, 16, 16), torch.randint(0, 1000, (8,)))
    for name, block in searchable_blocks(student).items():
        loss = noise_to_signal(block(*calls[name].args, **calls[name].kwargs), calls[name].output)
        if loss.requires_grad:
            loss.backward()
    assert any(p.grad is not None for p in student.parameters())


def test_load_teacher_from_model_and_pipeline_folders(tmp_path):
    unet = small_unet()
    unet.save_pretrained(tmp_path / "model")
    DDPMScheduler(num_train_timesteps=77, prediction_type="v_prediction").save_pretrained(tmp_path / "sched")
    loaded, scheduler = load_teacher(str(tmp_path / "model"), scheduler=str(tmp_path / "sched"))
    assert isinstance(scheduler, DDPMScheduler) and loaded.config.block_out_channels == [16, 32, 32]
    assert scheduler.config.num_train_timesteps == 77 and scheduler.config.prediction_type == "v_prediction"
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    DDPMScheduler(num_train_timesteps=123).save_pretrained(tmp_path / "pipe" / "scheduler")
    _, scheduler = load_teacher(str(tmp_path / "pipe"))
    assert scheduler.config.num_train_timesteps == 123
    # --scheduler overrides a pipeline's own schedule; it may name a pipeline folder too.
    _, scheduler = load_teacher(str(tmp_path / "pipe"), scheduler=str(tmp_path / "sched"))
    assert scheduler.config.num_train_timesteps == 77
    _, scheduler = load_teacher(str(tmp_path / "model"), scheduler=str(tmp_path / "pipe"))
    assert scheduler.config.num_train_timesteps == 123


def test_load_teacher_errors(tmp_path):
    with pytest.raises(TeacherError, match="teacher folder not found"):
        load_teacher(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="not a diffusers UNet folder"):
        load_teacher(str(tmp_path / "empty"))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(TeacherError, match="holds a AutoencoderKL"):
        load_teacher(str(tmp_path / "vae"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(TeacherError, match="not valid JSON"):
        load_teacher(str(tmp_path / "broken"))
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "config.json").write_text("[1, 2]")
    with pytest.raises(TeacherError, match="must hold a JSON object"):
        load_teacher(str(tmp_path / "listed"))
    # A bare UNet folder without a scheduler is an error that says so: no schedule is assumed.
    small_unet().save_pretrained(tmp_path / "bare")
    with pytest.raises(TeacherError, match="bare UNet folder without scheduler/: pass --scheduler DIR"):
        load_teacher(str(tmp_path / "bare"))
    with pytest.raises(TeacherError, match="no scheduler_config.json"):
        load_teacher(str(tmp_path / "bare"), scheduler=str(tmp_path / "empty"))
    DDPMScheduler().save_pretrained(tmp_path / "sched_ok")
    (tmp_path / "odd_sched").mkdir()
    DDPMScheduler().save_pretrained(tmp_path / "odd_sched")
    config = json.loads((tmp_path / "odd_sched" / "scheduler_config.json").read_text())
    (tmp_path / "odd_sched" / "scheduler_config.json").write_text(json.dumps(config | {"prediction_type": "flow"}))
    with pytest.raises(TeacherError, match="prediction_type 'flow' is not supported"):
        load_teacher(str(tmp_path / "bare"), scheduler=str(tmp_path / "odd_sched"))
    # class_embed_type "identity" takes embedding vectors, which no image folder provides.
    identity = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           class_embed_type="identity")
    identity.save_pretrained(tmp_path / "identity")
    with pytest.raises(TeacherError, match="class_embed_type 'identity' takes embedding vectors"):
        load_teacher(str(tmp_path / "identity"), scheduler=str(tmp_path / "sched_ok"))
