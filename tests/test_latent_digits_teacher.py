"""The shipped latent-digits teacher (an LDMPipeline folder), its training script and its quality check."""
import json
import os
import stat

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, LDMPipeline
from safetensors.torch import load_file

from pyevo.data import digits
from pyevo.teachers import LATENT_DIGITS_TEACHER_DIR
from pyevo.teachers.evaluate import TeacherEvalConfig, evaluate_samples
from pyevo.teachers.latent_digits import (LatentTeacherTrainConfig,
                                          evaluate_cli, load_latent_teacher, sample_latent_digits,
                                          train)

# A run small enough for a unit test: a few steps at tiny widths.
TINY = dict(vae_steps=3, vae_batch_size=8, vae_channels="8,8,8", steps=3, batch_size=8, unet_channels="8,16,16",
            attention_head_dim=8, warmup_steps=1, vae_warmup_steps=1, log_every=1)


@pytest.fixture(scope="module")
def shipped():
    return load_latent_teacher(LATENT_DIGITS_TEACHER_DIR)


def test_shipped_folder_is_a_small_world_readable_safetensors_ldm_pipeline():
    index = json.loads((LATENT_DIGITS_TEACHER_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline"
    assert index["vqvae"] == ["diffusers", "AutoencoderKL"] and index["unet"] == ["diffusers", "UNet2DModel"]
    assert not list(LATENT_DIGITS_TEACHER_DIR.rglob("*.bin"))
    weights = list(LATENT_DIGITS_TEACHER_DIR.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vqvae"}
    assert sum(w.stat().st_size for w in weights) < 16 * 2**20
    for path in LATENT_DIGITS_TEACHER_DIR.rglob("*"):
        assert path.stat().st_mode & stat.S_IROTH, path
    info = json.loads((LATENT_DIGITS_TEACHER_DIR / "training_info.json").read_text())
    assert info["unet"]["loss_history"] and info["vae"]["loss_history"] and info["torch"]


def test_ldm_pipeline_loads_offline_and_generates_32x32_digits():
    pipe = LDMPipeline.from_pretrained(LATENT_DIGITS_TEACHER_DIR, local_files_only=True)
    assert isinstance(pipe.vqvae, AutoencoderKL)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 1)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.05  # not blank


def test_latents_are_4x8x8_and_match_the_unet(shipped):
    codec, unet, scheduler = shipped
    latents = codec.encode(digits("heldout", size=32)[0][:5])
    assert latents.shape == (5, 4, 8, 8)
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (4, 4, 8)
    assert unet(latents, torch.tensor([10, 200, 500, 800, 999])).sample.shape == latents.shape
    assert scheduler.config.prediction_type == "epsilon" and not scheduler.config.clip_sample


def test_scaling_factor_gives_unit_variance_held_out_latents(shipped):
    codec = shipped[0]
    assert codec.scaling_factor != 0.18215  # set from the data, not diffusers' default
    latents = codec.encode(digits("heldout", size=32)[0])
    assert 0.7 < latents.std().item() < 1.4
    assert abs(latents.mean().item()) < 0.5


def test_autoencoder_reconstructs_held_out_digits(shipped):
    from pyevo.metrics import psnr

    codec = shipped[0]
    heldout = digits("heldout", size=32)[0][:50]
    reconstructions = codec.decode(codec.encode(heldout))
    assert psnr(reconstructions, heldout) > 20.0
    # and it is the images' own reconstruction: pairing them with other images is far worse
    assert psnr(reconstructions, heldout.roll(1, dims=0)) < psnr(reconstructions, heldout) - 5


def test_pyevo_sampler_and_decoder_match_diffusers_ldm_pipeline(shipped):
    """pyevo's path (ddim_sample in latent space, unclamped, then decode) is what LDMPipeline draws
    from the same seed: the teacher pyevo evaluates is the teacher diffusers users get."""
    codec, unet, scheduler = shipped
    ours, latents = sample_latent_digits(codec, unet, scheduler.config, n=3, steps=4, seed=5, progress=False)
    assert ours.shape == (3, 1, 32, 32) and latents.shape == (3, 4, 8, 8)
    assert latents.abs().max() > 1.0  # latents are not clamped like images
    pipe = LDMPipeline(vqvae=codec.vae, unet=unet,
                       scheduler=DDIMScheduler.from_pretrained(LATENT_DIGITS_TEACHER_DIR / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(5),
                  output_type="np").images
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_tiny_training_run_writes_a_loadable_ldm_folder(tmp_path):
    out = tmp_path / "teacher"
    train(LatentTeacherTrainConfig(**TINY, out=str(out)))
    assert not list(tmp_path.glob("teacher.tmp-*")) and not list(tmp_path.glob("*.old"))  # atomic
    pipe = LDMPipeline.from_pretrained(out, local_files_only=True)
    assert tuple(pipe.unet.config.block_out_channels) == (8, 16, 16)
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 4
    info = json.loads((out / "training_info.json").read_text())
    assert info["config"]["steps"] == 3 and len(info["unet"]["loss_history"]) == 3
    assert pipe.vqvae.config.scaling_factor == pytest.approx(info["vae"]["scaling_factor"])
    # the scaling factor is 1 / std of the training latents (posterior mode)
    from pyevo.autoencoder import LatentCodec

    assert LatentCodec(pipe.vqvae).encode(digits("train", size=32)[0]).std().item() == pytest.approx(1.0, abs=1e-3)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 1)

    # Stage 2 alone on the first run's autoencoder trains the UNet that the run of both stages did
    # (seeded per stage): the same weights, so two commands reproduce one.
    again = tmp_path / "again"
    train(LatentTeacherTrainConfig(**TINY, vae_from=str(out), out=str(again)))
    for part in ("vqvae", "unet"):
        first, second = (load_file(folder / part / "diffusion_pytorch_model.safetensors") for folder in (out, again))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), part
    info_again = json.loads((again / "training_info.json").read_text())
    assert info_again["vae"]["reused_from"] == str(out)
    assert info_again["vae"]["config"]["vae_channels"] == "8,8,8"
    # a different seed trains a different UNet
    other = tmp_path / "other"
    train(LatentTeacherTrainConfig(**TINY, vae_from=str(out), seed=1, out=str(other)))
    assert not torch.equal(*(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
                             for folder in (out, other)))


def test_evaluation_of_a_tiny_teacher_writes_the_report(tmp_path):
    out = tmp_path / "teacher"
    train(LatentTeacherTrainConfig(**TINY, out=str(out)))
    cfg = TeacherEvalConfig(n_samples=40, steps=2, reference_draws=2, balanced_per_class=2)
    report = tmp_path / "report.md"
    with pytest.raises(SystemExit, match="quality bar"):  # three steps of training are not a model
        evaluate_cli(str(out), str(report), num_threads=2, cfg=cfg)
    text = report.read_text()
    assert text.startswith("# Latent-digits teacher: quality check")
    assert "python -m pyevo.teachers.latent_digits --evaluate" in text
    assert "autoencoder: PSNR of held-out reconstructions" in text and "| bar met | NO |" in text
    raw = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    assert raw["config"]["n_samples"] == 40
    result, latent = raw["result"], raw["latent"]
    assert result["fd_samples"] > result["fd_floor"] > 0 and not result["passed"]
    assert len(result["class_shares"]) == 10 and sum(result["class_shares"]) == pytest.approx(1.0)
    assert latent["fd_vae_reconstruction"] > 0 and 0.7 < latent["heldout_latent_std"] < 1.4


def test_evaluate_samples_at_32x32_uses_the_32x32_floor_draw():
    """Real training images drawn as the floor draws them score exactly the floor (ratio 1) at 32x32."""
    cfg = TeacherEvalConfig(n_samples=300, reference_draws=1, balanced_per_class=5)
    train_images = digits("train", size=32)[0]
    floor_draw = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(cfg.floor_seed))
    result = evaluate_samples(train_images[floor_draw[:300]], 0.0, cfg, image_size=32)
    assert result.fd_ratio == pytest.approx(1.0)
    assert min(result.class_shares) > 0.05 and result.classifier_heldout_accuracy > 0.9
    # and not by construction: the next 300 training images score another FD
    other = evaluate_samples(train_images[floor_draw[300:600]], 0.0, cfg, image_size=32)
    assert other.fd_floor == result.fd_floor and other.fd_ratio != pytest.approx(1.0, abs=1e-3)


def test_the_balanced_bar_judges_the_class_balanced_fd_not_the_mixture():
    """Training images with a skewed class mixture: a worse FD than the balanced FD, so a bar between
    the two ratios fails under ``bar: fd`` and passes under ``bar: balanced``."""
    images, labels = digits("train", size=32)
    gen = torch.Generator().manual_seed(3)
    counts = [30, 30, 30, 18, 30, 30, 30, 30, 30, 42]  # 6% threes, 14% nines: inside the class bar
    picks = [torch.nonzero(labels == k).flatten() for k in range(10)]
    index = torch.cat([p[torch.randperm(len(p), generator=gen)[:n]] for p, n in zip(picks, counts)])
    samples = images[index]
    probe = evaluate_samples(samples, 0.0, TeacherEvalConfig(n_samples=300, reference_draws=1, balanced_per_class=15),
                             image_size=32)
    balanced_ratio = probe.fd_balanced_samples / probe.fd_balanced_train
    assert probe.fd_ratio > balanced_ratio
    between = (probe.fd_ratio + balanced_ratio) / 2
    verdicts = {bar: evaluate_samples(samples, 0.0, TeacherEvalConfig(n_samples=300, reference_draws=1,
                                                                       balanced_per_class=15, max_fd_ratio=between,
                                                                       bar=bar), image_size=32).passed
                for bar in ("fd", "balanced")}
    assert verdicts == {"fd": False, "balanced": True}
    with pytest.raises(ValueError, match="bar must be"):
        TeacherEvalConfig(bar="kid")
