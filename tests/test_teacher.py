"""The shipped digits teacher and classifier, DDIM sampling, the sample CLI, the training script."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only

import pytest
import torch
from PIL import Image

from pyevo.classifier import DIGITS_CLASSIFIER_DIR, accuracy, load_digits_classifier
from pyevo.data import digits
from pyevo.sample import ddim_sample, image_grid
from pyevo.sample import main as sample_main
from pyevo.teacher import TeacherError, load_teacher
from pyevo.teachers import DIGITS_TEACHER_DIR
from pyevo.teachers.digits import TeacherTrainConfig, build_digits_unet, timestep_weights, train


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits")


def test_teacher_folder_is_a_small_safetensors_pipeline():
    assert (DIGITS_TEACHER_DIR / "model_index.json").is_file()
    weights = DIGITS_TEACHER_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 10 * 2**20
    assert not list(DIGITS_TEACHER_DIR.rglob("*.bin"))


def test_teacher_has_the_documented_config(teacher):
    unet, scheduler = teacher
    cfg = unet.config
    assert cfg.sample_size == 16 and cfg.in_channels == 1 and cfg.out_channels == 1
    assert tuple(cfg.block_out_channels) == (32, 64, 64)
    assert cfg.layers_per_block == 2 and cfg.norm_num_groups == 8 and cfg.attention_head_dim == 16
    assert tuple(cfg.down_block_types) == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    assert tuple(cfg.up_block_types) == ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert unet.down_blocks[1].attentions[0].heads == 4  # several heads: the head-ratio choice applies
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in build_digits_unet().parameters())
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert scheduler.config.prediction_type == "epsilon"


def test_teacher_forward_shape(teacher):
    unet, _ = teacher
    out = unet(torch.randn(3, 1, 16, 16), torch.tensor([0, 500, 999])).sample
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()


def test_few_step_ddim_sample_is_finite_and_deterministic(teacher):
    unet, scheduler = teacher
    a = ddim_sample(unet, dict(scheduler.config), n=6, steps=4, seed=1, progress=False)
    b = ddim_sample(unet, dict(scheduler.config), n=6, steps=4, seed=1, batch_size=4, progress=False)
    assert a.shape == (6, 1, 16, 16) and torch.isfinite(a).all()
    assert a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b)  # independent of batching


def test_classifier_heldout_accuracy():
    classifier = load_digits_classifier()
    images, labels = digits("heldout")
    assert accuracy(classifier, images, labels) >= 0.95
    assert classifier(images[:2]).shape == (2, 10) and classifier.features(images[:2]).shape == (2, 64)


def test_loaders_reject_bad_folders(tmp_path):
    with pytest.raises(TeacherError, match="not a diffusers UNet folder"):
        load_teacher(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a digits classifier folder"):
        load_digits_classifier(tmp_path)
    assert DIGITS_CLASSIFIER_DIR.is_dir()


def test_sample_cli_writes_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    sample_main(["--out", str(out), "--n", "5", "--steps", "2", "--seed", "3"])
    with Image.open(out) as image:
        assert image.mode == "L"
        assert image.size == image_grid(torch.zeros(5, 1, 16, 16)).size


def test_sample_cli_bad_teacher_path_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit) as exc:
        sample_main(["--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")])
    message = str(exc.value.code)
    assert message.startswith("error:") and "nowhere" in message and "\n" not in message
    assert not (tmp_path / "x.png").exists()


def test_timestep_weights_follow_min_snr_and_p2():
    snr = torch.tensor([1e-4, 0.5, 1.0, 5.0, 50.0], dtype=torch.float64)
    plain = timestep_weights(snr, TeacherTrainConfig(snr_gamma=0.0))
    assert torch.equal(plain, torch.ones_like(snr))
    min_snr = timestep_weights(snr, TeacherTrainConfig(snr_gamma=5.0))
    torch.testing.assert_close(min_snr, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.1], dtype=torch.float64))
    both = timestep_weights(snr, TeacherTrainConfig(snr_gamma=5.0, p2_gamma=1.0, p2_k=1.0))
    expected = torch.tensor([1 / 1.0001, 1 / 1.5, 0.5, 1 / 6, 0.1 / 51], dtype=torch.float64)
    torch.testing.assert_close(both, expected)


def test_training_script_writes_a_loadable_teacher(tmp_path):
    out = tmp_path / "teacher"
    train(TeacherTrainConfig(steps=2, batch_size=8, warmup_steps=1, log_every=1, out=str(out)))
    unet, scheduler = load_teacher(str(out))
    assert (out / "training_info.json").is_file()
    assert not list(tmp_path.glob("teacher.tmp-*"))  # written atomically, nothing left over
    # A bare UNet folder takes its schedule from --scheduler (a pipeline folder will do), never a default.
    unet.save_pretrained(tmp_path / "bare_unet")
    with pytest.raises(TeacherError, match="without scheduler/: pass --scheduler"):
        load_teacher(str(tmp_path / "bare_unet"))
    _, bare_scheduler = load_teacher(str(tmp_path / "bare_unet"), scheduler=str(out))
    assert bare_scheduler.config.beta_schedule == scheduler.config.beta_schedule


def test_iid_reference_draws_are_multinomial_draws_without_repeats():
    from pyevo.teachers.evaluate import TeacherEvalConfig, balanced_index, iid_reference_draws

    images, labels = digits("train")
    heldout_labels = digits("heldout")[1]
    # Tag each training image with its index so draws can be traced back.
    tagged = torch.arange(len(images))
    cfg = TeacherEvalConfig(n_samples=300, reference_draws=3)
    draws = list(iid_reference_draws(tagged, labels, heldout_labels, cfg))
    assert len(draws) == 3
    counts = []
    for draw in draws:
        assert len(draw) == 300 and len(set(draw.tolist())) == 300  # no image twice in one draw
        counts.append(torch.bincount(labels[draw], minlength=10))
    # Independent class draws: the counts vary between draws (a stratified draw would not).
    assert not torch.equal(counts[0], counts[1]) or not torch.equal(counts[1], counts[2])
    assert all(int(c.sum()) == 300 for c in counts)
    balanced = balanced_index(labels, 7, seed=0)
    assert torch.equal(torch.bincount(labels[balanced], minlength=10), torch.full((10,), 7))


def test_a_fourier_time_embedding_teacher_is_refused_up_front(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    from pyevo.teacher import TeacherError, load_teacher

    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                norm_num_groups=8, time_embedding_type="fourier", down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "unet")
    DDPMScheduler(num_train_timesteps=10).save_pretrained(tmp_path / "scheduler")
    with pytest.raises(TeacherError, match="time_embedding_type 'fourier' takes continuous noise levels"):
        load_teacher(str(tmp_path))
