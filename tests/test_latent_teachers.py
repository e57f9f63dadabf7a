"""Latent teachers: a random-init latent UNet2DModel with a tiny AutoencoderKL (and a VQModel),
saved by the test itself. The whole CLI over an image folder and data-free; the student reloads in
a fresh process and generates through LDMPipeline with the teacher's VAE; the codec against
diffusers' own encode/decode; bad VAEs refused in one line with nothing written."""
import json
from functools import partial

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, VQModel

from pyevo.autoencoder import (AutoencoderError, LatentCodec, check_latent_teacher, has_own_autoencoder,
                               image_shape, load_autoencoder, teacher_autoencoder)
from tests.test_real_teachers import _assert_one_line_refusal, cli, fresh_process, small_unet, write_images

IMAGE_SIZE = 16  # the tiny VAE halves once: 16x16x3 images <-> 8x8x4 latents, the UNet's sample


def tiny_kl(latent_channels: int = 4, in_channels: int = 3, sample_size: int = IMAGE_SIZE, **extra) -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         sample_size=sample_size, scaling_factor=0.7, **extra)


def tiny_vq() -> VQModel:
    torch.manual_seed(2)
    return VQModel(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                   norm_num_groups=8, num_vq_embeddings=32, vq_embed_dim=4, sample_size=IMAGE_SIZE,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture(scope="module")
def latent_teacher(tmp_path_factory):
    """A pipeline folder (unet/, vae/, scheduler/) and a 16x16 RGB image folder."""
    root = tmp_path_factory.mktemp("latent_teacher")
    small_unet(4).save_pretrained(root / "pipeline" / "unet")
    tiny_kl().save_pretrained(root / "pipeline" / "vae")
    # Latents are not images: the schedule must not clip them to [-1, 1].
    DDPMScheduler(num_train_timesteps=100, clip_sample=False).save_pretrained(root / "pipeline" / "scheduler")
    write_images(root / "images", 24, channels=3)
    return root


def test_latent_teacher_runs_end_to_end_and_its_student_generates_through_ldm_pipeline(latent_teacher, tmp_path):
    out = tmp_path / "run"
    result = cli("--teacher", str(latent_teacher / "pipeline"), "--data", str(latent_teacher / "images"),
                 "--out", str(out), "--metric-features", "none", f"--set=latency.cache={tmp_path / 'lat.json'}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    latent = report["latent"]
    assert latent["autoencoder"] == "AutoencoderKL" and latent["posterior"] == "mode"
    assert latent["latent_shape"] == [4, 8, 8] and latent["image_shape"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert latent["decode_ms"] > 0
    assert latent["teacher_batch_ms"] == pytest.approx(2 * report["teacher"]["latency_ms"] + latent["decode_ms"])
    assert "decode, once per batch" in (out / "report.md").read_text()
    # Training ran on the cached latents of the images (the VAE's, scaled), evaluation on decoded samples.
    vae = AutoencoderKL.from_pretrained(latent_teacher / "pipeline" / "vae")
    cached = safetensors.torch.load_file(out / "latents.safetensors")
    assert cached["train.latents"].shape[1:] == (4, 8, 8)
    samples = safetensors.torch.load_file(out / "samples.safetensors")
    assert samples["teacher"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert samples["student"].abs().max() <= 1.0
    from pyevo.data import ImageFolder

    images = ImageFolder(latent_teacher / "images", size=IMAGE_SIZE, channels=3)
    stack = torch.stack([images[i] for i in range(len(images))])
    with torch.no_grad():
        expected = vae.encode(stack).latent_dist.mode() * vae.config.scaling_factor
    every = torch.cat([cached["train.latents"], cached["heldout.latents"]])
    # Each cached latent is the VAE's latent of one of the images (the split reorders them).
    distance = torch.cdist(every.flatten(1), expected.flatten(1))
    assert distance.min(dim=1).values.max() < 1e-4

    # Resumed, every stage (the latents included) is read back and the run ends the same.
    resumed = cli("--teacher", str(latent_teacher / "pipeline"), "--data", str(latent_teacher / "images"),
                  "--out", str(out), "--metric-features", "none", f"--set=latency.cache={tmp_path / 'lat.json'}",
                  "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((out / "report.json").read_text())
    assert again["stages"] == report["stages"] and again["student"]["genome"] == report["student"]["genome"]

    fresh_process(f"""
        import torch, pyevo
        from diffusers import AutoencoderKL, DDIMScheduler, LDMPipeline
        student = pyevo.StudentUNet2DModel.from_pretrained({str(out / "student")!r})
        vae = AutoencoderKL.from_pretrained({str(latent_teacher / "pipeline" / "vae")!r})
        scheduler = DDIMScheduler.from_pretrained({str(latent_teacher / "pipeline" / "scheduler")!r})
        pipe = LDMPipeline(vqvae=vae, unet=student, scheduler=scheduler)
        images = pipe(batch_size=2, num_inference_steps=3, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), images.shape
    """)


def test_data_free_latent_teacher_trains_without_the_vae_and_decodes_for_evaluation(latent_teacher, tmp_path):
    out = tmp_path / "run"
    vae_folder = latent_teacher / "pipeline" / "vae"
    result = cli("--teacher", str(latent_teacher / "pipeline" / "unet"), "--scheduler",
                 str(latent_teacher / "pipeline" / "scheduler"), "--vae", str(vae_folder), "--data", "data-free",
                 "--out", str(out), "--metric-features", "none", f"--set=latency.cache={tmp_path / 'lat.json'}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["latent"]["posterior"] is None and report["latent"]["folder"] == str(vae_folder)
    assert not (out / "latents.safetensors").exists()
    assert safetensors.torch.load_file(out / "samples.safetensors")["student"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)


def test_sample_cli_decodes_a_latent_teachers_samples(latent_teacher, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from tests.test_real_teachers import ENV

    grid = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, "-m", "pyevo.sample", "--teacher", str(latent_teacher / "pipeline"),
                             "--n", "4", "--steps", "2", "--out", str(grid)], capture_output=True, text=True,
                            env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # 2x2 tiles of decoded 16x16 RGB images, 1-pixel gaps, each pixel drawn 4x4.
    with Image.open(grid) as image:
        assert image.mode == "RGB" and image.size == (4 * (2 * (IMAGE_SIZE + 1) + 1),) * 2


def test_codec_matches_diffusers_encode_and_decode_with_scaling_and_shift(tmp_path):
    tiny_kl(shift_factor=0.25).save_pretrained(tmp_path / "kl")
    codec = load_autoencoder(tmp_path / "kl")
    vae = AutoencoderKL.from_pretrained(tmp_path / "kl")
    images = torch.rand(5, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64) * 2 - 1
    codec.vae.double()
    vae.double()
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        latents = codec.encode(images, batch_size=2)
        assert latents.dtype == torch.float64
        assert torch.allclose(latents, (posterior.mode() - 0.25) * 0.7, atol=1e-12)
        decoded = codec.decode(latents, batch_size=3)
        reference = vae.decode(latents / 0.7 + 0.25).sample.clamp(-1, 1)
    assert decoded.dtype == torch.float32 and torch.allclose(decoded, reference.float(), atol=1e-6)
    # A posterior draw is seeded and is the mean plus std times unit noise.
    first, again = codec.encode(images, "sample", seed=3), codec.encode(images, "sample", seed=3)
    assert torch.equal(first, again) and not torch.allclose(first, latents)
    unit = (first / 0.7 + 0.25 - posterior.mean) / posterior.std
    assert 0.8 < unit.std() < 1.2 and abs(unit.mean()) < 0.2
    with pytest.raises(ValueError, match="posterior"):
        codec.encode(images, "median")


@pytest.mark.parametrize("posterior", ["mode", "sample"])
def test_an_encoding_killed_between_batches_resumes_to_the_uninterrupted_latents(tmp_path, posterior):
    """The encode stage keeps each batch's latents as it goes (Stages.kept_batches): a kill loses only
    the batch in progress, and the resumed encoding, its posterior draws included, equals one that ran
    through; a resume finds the set whole once it was."""
    from pyevo.diffusion import ImageSet
    from pyevo.pipeline import Stages, encode_images

    tiny_kl().save_pretrained(tmp_path / "kl")
    codec = load_autoencoder(tmp_path / "kl")
    sets = {"train": ImageSet(torch.rand(7, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1, torch.arange(7)),
            "heldout": ImageSet(torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1, torch.arange(3))}
    original = codec.encode
    codec.encode = lambda *args, **kwargs: original(*args, **{**kwargs, "batch_size": 2})  # 4 train batches
    whole = encode_images(codec, sets, posterior, 5, tmp_path / "whole.safetensors")

    class Killed(Exception):
        pass

    stages = Stages(tmp_path / "run", resume=True)
    stages.key = "encode-key"
    made = []

    def kept(name, encode, kill_at=None):
        def draw(done, on_batch):
            made.append((name, len(done)))

            def keep(index, latents):
                on_batch(index, latents)
                if index == kill_at:
                    raise Killed
            return encode(done, keep)
        return stages.kept_batches("encode", name, draw)

    with pytest.raises(Killed):
        encode_images(codec, sets, posterior, 5, tmp_path / "run.safetensors", partial(kept, kill_at=1))
    assert made == [("train", 0)]
    made.clear()
    resumed = encode_images(codec, sets, posterior, 5, tmp_path / "run.safetensors", kept)
    assert made == [("train", 2), ("heldout", 0)]  # the two kept batches taken, the rest encoded
    for name in sets:
        assert torch.equal(resumed[name].images, whole[name].images), name
        assert torch.equal(resumed[name].labels, whole[name].labels)
    made.clear()
    again = encode_images(codec, sets, posterior, 5, tmp_path / "again.safetensors", kept)
    assert made == [] and torch.equal(again["train"].images, whole["train"].images)  # read back whole


def test_vq_model_pipeline_folder_is_found_in_vqvae_and_decodes_with_quantisation(tmp_path):
    pipeline = tmp_path / "ldm"
    small_unet(4).save_pretrained(pipeline / "unet")
    tiny_vq().save_pretrained(pipeline / "vqvae")
    codec = teacher_autoencoder(str(pipeline))
    assert codec.kind == "VQModel" and codec.folder == pipeline / "vqvae"
    check_latent_teacher(codec, small_unet(4))
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = codec.vae.decode(latents / codec.scaling_factor).sample.clamp(-1, 1)  # quantises, as LDMPipeline
    assert torch.allclose(codec.decode(latents), expected)
    assert teacher_autoencoder(str(tmp_path / "nowhere-but-a-name")) is None
    assert has_own_autoencoder(str(pipeline)) and not has_own_autoencoder(str(tmp_path / "nowhere-but-a-name"))


def test_a_models_images_are_its_samples_or_a_latent_models_decoded_ones():
    pixel = small_unet(3)
    assert image_shape(pixel, None) == (3, pixel.config.sample_size, pixel.config.sample_size)
    codec = LatentCodec(tiny_vq())
    latents = torch.randn(1, *image_shape(small_unet(4), None))  # a latent UNet's samples
    with torch.no_grad():
        decoded = codec.decode(latents)
    assert image_shape(small_unet(4), codec) == tuple(decoded.shape[1:])


@pytest.mark.parametrize("case, message", [
    ("channels", "makes 3-channel latents, but the UNet takes 4 channels"),
    ("size", "maps 32x32 images to 16x16 latents, but the UNet's sample_size is 8x8"),
    ("not-a-vae", "not a VAE"),
    ("image-channels", "takes 2-channel images"),
    ("missing", "VAE folder not found"),
])
def test_bad_vae_is_refused_in_one_line_and_nothing_is_written(latent_teacher, tmp_path, case, message):
    vae = tmp_path / "vae"
    if case == "channels":
        tiny_kl(latent_channels=3).save_pretrained(vae)
    elif case == "size":
        tiny_kl(sample_size=32).save_pretrained(vae)
    elif case == "not-a-vae":
        small_unet(4).save_pretrained(vae)
    elif case == "image-channels":
        tiny_kl(in_channels=2).save_pretrained(vae)
    out = tmp_path / "run"
    result = cli("--teacher", str(latent_teacher / "pipeline"), "--vae", str(vae), "--data",
                 str(latent_teacher / "images"), "--out", str(out), f"--set=latency.cache={tmp_path / 'lat.json'}")
    _assert_one_line_refusal(result, out, message)
    assert not out.exists() and not (tmp_path / "lat.json").exists()


def test_digits_data_must_fit_the_vae_and_the_codec_refuses_what_it_cannot_take(latent_teacher, tmp_path):
    out = tmp_path / "run"
    result = cli("--teacher", str(latent_teacher / "pipeline"), "--out", str(out),
                 f"--set=latency.cache={tmp_path / 'lat.json'}")  # data: digits, grey; this VAE takes RGB
    _assert_one_line_refusal(result, out, "data 'digits' is grey square images but the teacher's AutoencoderKL "
                                          f"takes 3x{IMAGE_SIZE}x{IMAGE_SIZE}")
    assert not out.exists()
    with pytest.raises(AutoencoderError, match="holds no autoencoder"):
        load_autoencoder(latent_teacher / "images")
