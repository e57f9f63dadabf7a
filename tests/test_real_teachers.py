"""The whole CLI on random-init teachers of the kinds users bring, saved by the test itself: a
v-prediction pixel UNet2DModel (bare folder + --scheduler; data-free and an image folder) and a
class-conditional UNet2DModel (class sub-folders). Each student reloads in a fresh process and
samples with outputs of the teacher's shape."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

TOY = {
    "distill.steps": 2, "distill.batch_size": 8, "search.population": 4, "search.generations": 1,
    "search.heldout_size": 8, "retrain.steps": 2, "retrain.batch_size": 8, "evaluate.num_samples": 6,
    "evaluate.ddim_steps": 2, "latency.warmup": 1, "latency.repeats": 2, "latency.network_repeats": 2,
    "latency.threads": 1, "batch": 2, "search.max_macs": 1, "search.max_params": 1,
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def small_unet(channels: int, **extra) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), **extra)


def write_images(folder, count: int, channels: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (12, 12, 3) if channels == 3 else (12, 12), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def cli(*args):
    flags = [f"--set={key}={value}" for key, value in TOY.items()]
    return subprocess.run([sys.executable, "-m", "pyevo.search", "--quiet", *args, *flags], capture_output=True,
                          text=True, env=ENV, timeout=600)


def fresh_process(script: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def v_teacher(tmp_path_factory):
    """A bare UNet folder and, apart, its v-prediction schedule."""
    root = tmp_path_factory.mktemp("v_teacher")
    small_unet(3).save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction").save_pretrained(root / "schedule")
    write_images(root / "images", 24, channels=3)
    return root


@pytest.mark.parametrize("data", ["data-free", "images"])
def test_v_prediction_teacher_runs_end_to_end_and_its_student_samples_through_ddim(v_teacher, tmp_path, data):
    out = tmp_path / "run"
    result = cli("--teacher", str(v_teacher / "unet"), "--scheduler", str(v_teacher / "schedule"),
                 "--data", "data-free" if data == "data-free" else str(v_teacher / "images"),
                 "--out", str(out), f"--set=latency.cache={tmp_path / 'lat.json'}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["prediction_type"] == "v_prediction" and not report["class_conditional"]
    assert report["train_dtype"] == "float32"  # auto on the CPU
    assert report["student"]["psnr_vs_teacher"] is not None and report["features"]["note"]
    stdout = fresh_process(f"""
        import torch, pyevo
        from diffusers import DDIMPipeline, DDIMScheduler
        student = pyevo.StudentUNet2DModel.from_pretrained({str(out / "student")!r})
        scheduler = DDIMScheduler.from_pretrained({str(v_teacher / "schedule")!r})
        assert scheduler.config.prediction_type == "v_prediction"
        images = DDIMPipeline(unet=student, scheduler=scheduler)(
            batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 8, 8, 3), images.shape
        print(student.config.genome)
    """)
    assert stdout.strip().splitlines()[-1] == report["student"]["genome"]


@pytest.fixture(scope="module")
def class_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("class_teacher")
    pipeline = root / "pipeline"
    small_unet(1, num_class_embeds=3).save_pretrained(pipeline / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(pipeline / "scheduler")
    for label in range(3):
        write_images(root / "classes" / str(label), 8, channels=1, seed=label)
    return root


def test_class_conditional_teacher_runs_end_to_end_and_its_student_takes_class_labels(class_teacher, tmp_path):
    out = tmp_path / "run"
    result = cli("--teacher", str(class_teacher / "pipeline"), "--data", str(class_teacher / "classes"),
                 "--out", str(out), "--metric-features", "none", f"--set=latency.cache={tmp_path / 'lat.json'}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["class_conditional"] and report["features"]["kind"] == "none"
    assert set(report["student"]["per_class"]) == {"0", "1", "2"}
    assert "Per class" in (out / "report.md").read_text()
    fresh_process(f"""
        import torch, pyevo
        from diffusers import DDPMScheduler, UNet2DModel
        from pyevo.sample import ddim_sample
        student = pyevo.StudentUNet2DModel.from_pretrained({str(out / "student")!r})
        teacher = UNet2DModel.from_pretrained({str(class_teacher / "pipeline" / "unet")!r})
        scheduler = DDPMScheduler.from_pretrained({str(class_teacher / "pipeline" / "scheduler")!r})
        labels = torch.tensor([0, 1, 2, 2])
        samples = ddim_sample(student, scheduler.config, 4, steps=3, seed=0, progress=False, class_labels=labels)
        assert samples.shape == (4, 1, 8, 8) and torch.isfinite(samples).all()
        # The forward takes class_labels as diffusers' UNet2DModel does: they change the output,
        # and leaving them out is the same error.
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
        with torch.no_grad():
            a = student(x, t, class_labels=torch.tensor([0, 0])).sample
            b = student(x, t, class_labels=torch.tensor([1, 1])).sample
        assert a.shape == (2, 1, 8, 8) and not torch.allclose(a, b)
        errors = []
        for model in (teacher, student):
            try:
                model(x, t)
            except ValueError as error:
                errors.append(str(error))
        assert len(errors) == 2 and errors[0] == errors[1], errors
    """)


def _assert_one_line_refusal(result, out, message):
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pyevo.search: error: ") and message in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_bad_inputs_for_real_teachers_are_one_line_refusals(v_teacher, class_teacher, tmp_path):
    out = tmp_path / "run"
    _assert_one_line_refusal(cli("--teacher", str(v_teacher / "unet"), "--data", "data-free", "--out", str(out)),
                             out, "bare UNet folder without scheduler/: pass --scheduler DIR")
    loose = tmp_path / "loose"
    write_images(loose, 4, channels=1)
    _assert_one_line_refusal(cli("--teacher", str(class_teacher / "pipeline"), "--data", str(loose),
                                 "--out", str(out)), out, "a class-conditional teacher needs one sub-folder per class")
    too_many = tmp_path / "too_many"
    for label in (0, 5):
        write_images(too_many / str(label), 2, channels=1)
    _assert_one_line_refusal(cli("--teacher", str(class_teacher / "pipeline"), "--data", str(too_many),
                                 "--out", str(out)), out, "has label 5, outside the teacher's num_class_embeds (3")
    _assert_one_line_refusal(cli("--metric-features", "clip", "--out", str(out)), out,
                             "evaluate.features must be one of auto, inception, digits, none")
    identity = tmp_path / "identity"
    small_unet(1, class_embed_type="identity").save_pretrained(identity / "unet")
    DDPMScheduler().save_pretrained(identity / "scheduler")
    _assert_one_line_refusal(cli("--teacher", str(identity), "--out", str(out)), out,
                             "class_embed_type 'identity' takes embedding vectors")


def test_help_lists_every_config_key_and_show_config_resolves_the_preset():
    from pyevo.config import describe_keys

    helped = subprocess.run([sys.executable, "-m", "pyevo.search", "--help"], capture_output=True, text=True,
                            env=ENV, timeout=120)
    assert helped.returncode == 0
    listing = helped.stdout.split("config keys (set with")[1].splitlines()
    for key, default, allowed in describe_keys():
        line = next(line for line in listing if line.strip().startswith(key + " "))
        assert repr(default) in line and allowed in line
    shown = subprocess.run([sys.executable, "-m", "pyevo.search", "--preset", "quick", "--show-config",
                            "--set", "retrain.steps=3"], capture_output=True, text=True, env=ENV, timeout=120)
    assert shown.returncode == 0, shown.stderr
    import yaml

    from pyevo.config import PRESETS
    resolved = yaml.safe_load(shown.stdout)
    assert resolved["retrain"]["steps"] == 3  # --set comes after the preset
    assert resolved["distill"]["steps"] == PRESETS["quick"]["distill.steps"]


def test_unreadable_image_in_data_is_one_line_or_skipped_with_data_skip_bad(v_teacher, tmp_path):
    images = tmp_path / "images"
    write_images(images, 12, channels=3)
    (images / "005.png").write_bytes((images / "005.png").read_bytes()[:40])  # truncated
    args = ["--teacher", str(v_teacher / "unet"), "--scheduler", str(v_teacher / "schedule"), "--data", str(images),
            "--metric-features", "none", f"--set=latency.cache={tmp_path / 'lat.json'}"]
    refused = cli(*args, "--out", str(tmp_path / "refused"))
    _assert_one_line_refusal(refused, tmp_path / "refused", "cannot read image")
    assert "005.png" in refused.stderr and "--data-skip-bad" in refused.stderr
    skipped = cli(*args, "--out", str(tmp_path / "run"), "--data-skip-bad")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert (tmp_path / "run" / "report.json").is_file()
