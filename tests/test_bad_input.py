"""Every bad input of docs/bad_input.md: one line on stderr naming the problem and what to do, exit 2,
and nothing that existed before overwritten, lost or left over.

The CLI runs in this process (``pyevo.search.__main__.main``) on a tiny teacher saved once; almost every
row is refused before any stage runs, so each takes a fraction of a second. The rows that need a run to
get going (a full disk in the middle of one, skipped images) use the whole pipeline at toy sizes (a few
seconds). The op rows call ``torch.ops.pyevo.*`` with bad arguments.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

import pyevo  # noqa: F401  (registers torch.ops.pyevo)
from pyevo.search.__main__ import main

TOY = {
    "distill.steps": 2, "distill.batch_size": 8, "search.population": 4, "search.generations": 1,
    "search.heldout_size": 8, "retrain.steps": 2, "retrain.batch_size": 8, "evaluate.num_samples": 6,
    "evaluate.ddim_steps": 2, "latency.warmup": 1, "latency.repeats": 2, "latency.network_repeats": 2,
    "latency.threads": 1, "batch": 2, "search.max_macs": 1, "search.max_params": 1, "evaluate.features": "none",
}
# The latency cache every row starts from: an entry another run timed, which must survive every row.
CACHE = {"ratio-to-teacher-block,kept-heap|another machine|torch0|float32|b2|abc|mid_block|r0:skip": 0.5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pixel teacher (1x8x8, a pipeline folder) and ten grey 12x12 images."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(root / "teacher")
    write_images(root / "images", 10)
    return root


def write_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under ``roots`` (hidden ones too: a leftover temporary counts) and its bytes."""
    return {str(p): p.read_bytes() for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file()}


class Row:
    """One row: paths in a fresh folder, the CLI's arguments, and the run folder and cache it uses."""

    def __init__(self, world: Path, tmp: Path):
        self.world, self.tmp = world, tmp
        self.out = tmp / "run"
        self.cache = tmp / "latency.json"
        self.cache.write_text(json.dumps(CACHE))
        self.teacher = str(world / "teacher")
        self.data = str(world / "images")
        self.extra: list[str] = []

    def copy_teacher(self) -> Path:
        import shutil

        copy = self.tmp / "teacher"
        shutil.copytree(self.world / "teacher", copy)
        self.teacher = str(copy)
        return copy

    def copy_images(self) -> Path:
        import shutil

        copy = self.tmp / "images"
        shutil.copytree(self.world / "images", copy)
        self.data = str(copy)
        return copy

    def args(self) -> list[str]:
        return ["--quiet", "--teacher", self.teacher, "--data", self.data, "--out", str(self.out),
                f"--set=latency.cache={self.cache}", *(f"--set={k}={v}" for k, v in TOY.items()), *self.extra]


def cli(capsys, args: list[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(code: int, err: list[str], message: str) -> None:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("pyevo.search: error: "), err
    assert message in err[0], err


# --- rows refused before anything runs: (id, what to set up, the message) ------------------------------
ROWS = {}


def row(name: str, message: str):
    def register(setup):
        ROWS[name] = (setup, message)
        return setup
    return register


# config values
row("config-latency-threads-0", "latency.threads must be >= 1, got 0")(
    lambda r: r.extra.append("--set=latency.threads=0"))
row("config-negative-learning-rate", "retrain.lr must be > 0, got -1.0")(
    lambda r: r.extra.append("--set=retrain.lr=-1"))
row("config-num-samples-1", "evaluate.num_samples must be >= 2, got 1")(
    lambda r: r.extra.append("--set=evaluate.num_samples=1"))
row("config-population-not-a-multiple-of-4", "search.population must be a multiple of 4, got 6")(
    lambda r: r.extra.append("--set=search.population=6"))
row("config-set-without-equals", "--set takes KEY=VALUE, got 'distill.steps'")(
    lambda r: r.extra.extend(["--set", "distill.steps"]))
row("config-unknown-preset", "unknown preset 'fast'; known: quick")(lambda r: r.extra.extend(["--preset", "fast"]))
row("config-bad-bool", "latency.cuda_graph must be true or false, got 'maybe'")(
    lambda r: r.extra.append("--set=latency.cuda_graph=maybe"))
row("config-device-name", "device must be 'cpu' or 'cuda[:N]', got 'cuda:x'")(
    lambda r: r.extra.extend(["--device", "cuda:x"]))
row("config-ddim-steps-beyond-the-schedule", "evaluate.ddim_steps must be <= the teacher's 100 training timesteps")(
    lambda r: r.extra.append("--set=evaluate.ddim_steps=500"))


@row("config-yaml-infinite-steps", "distill.steps must be an integer, got inf")
def _(r):
    (r.tmp / "run.yaml").write_text("distill:\n  steps: .inf\n")
    r.extra.extend(["--config", str(r.tmp / "run.yaml")])


@row("config-yaml-not-text", "cannot be read")
def _(r):
    (r.tmp / "run.yaml").write_bytes(b"\xff\xfe\x00binary")
    r.extra.extend(["--config", str(r.tmp / "run.yaml")])


@row("config-cuda-without-a-gpu", "device 'cuda' asked for, but this torch sees no CUDA device")
def _(r):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    r.extra.extend(["--device", "cuda"])


# teacher folder
def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@row("teacher-config-json-list", "config.json must hold a JSON object, not a list")
def _(r):
    (r.copy_teacher() / "unet" / "config.json").write_text("[16, 32]")


@row("teacher-config-json-not-json", "config.json is not valid JSON")
def _(r):
    (r.copy_teacher() / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel", ')


@row("teacher-config-field-wrong-type", "sample_size must be a positive integer or [height, width], got 'big'")
def _(r):
    _edit_json(r.copy_teacher() / "unet" / "config.json", sample_size="big")


@row("teacher-config-channels-wrong-type", "in_channels must be a positive integer, got '1'")
def _(r):
    _edit_json(r.copy_teacher() / "unet" / "config.json", in_channels="1")


@row("teacher-weights-truncated", "cannot load the UNet in")
def _(r):
    weights = next((r.copy_teacher() / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])


@row("teacher-scheduler-config-corrupt", "scheduler_config.json is not valid JSON")
def _(r):
    (r.copy_teacher() / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1')


@row("teacher-scheduler-field-wrong-type", "num_train_timesteps must be a positive integer, got 'many'")
def _(r):
    _edit_json(r.copy_teacher() / "scheduler" / "scheduler_config.json", num_train_timesteps="many")


@row("teacher-scheduler-flag-nowhere", "no scheduler_config.json there")
def _(r):
    r.extra.extend(["--scheduler", str(r.tmp / "nowhere")])


@row("teacher-fourier-time-embedding", "time_embedding_type 'fourier' takes continuous noise levels")
def _(r):
    _edit_json(r.copy_teacher() / "unet" / "config.json", time_embedding_type="fourier")


# data
@row("data-folder-missing", "data folder not found")
def _(r):
    r.data = str(r.tmp / "no-images")


@row("data-folder-without-images", "holds no images")
def _(r):
    (r.tmp / "empty").mkdir()
    r.data = str(r.tmp / "empty")


@row("data-one-image", "holds 1 image(s); pyevo needs at least 2")
def _(r):
    write_images(r.tmp / "one", 1)
    r.data = str(r.tmp / "one")


@row("data-truncated-image-among-good-ones", "cannot read image")
def _(r):
    bad = r.copy_images() / "003.png"
    bad.write_bytes(bad.read_bytes()[:40])
    r.expect_in_line = ["003.png", "--data-skip-bad"]


@row("data-corrupt-image-among-good-ones", "cannot read image")
def _(r):
    (r.copy_images() / "004.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    r.expect_in_line = ["004.png", "--data-skip-bad"]


@row("data-empty-image-file", "cannot read image")
def _(r):
    (r.copy_images() / "005.png").write_bytes(b"")
    r.expect_in_line = ["005.png"]


@row("data-every-image-unreadable-with-skip-bad", "none of its 10 images could be read")
def _(r):
    for path in r.copy_images().glob("*.png"):
        path.write_bytes(b"not an image")
    r.extra.append("--data-skip-bad")


# run folder
@row("out-under-a-file", "is not a folder; choose another --out")
def _(r):
    (r.tmp / "a_file").write_text("x")
    r.out = r.tmp / "a_file" / "run"


@row("out-on-a-path-that-cannot-be-created", "cannot create or write the run folder /proc/")
def _(r):
    r.out = Path("/proc/pyevo-no-such-folder/run")


@row("out-read-only", "is not writable")
def _(r):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders (out-on-a-path-that-cannot-be-created covers the probe)")
    (r.tmp / "locked").mkdir()
    (r.tmp / "locked").chmod(0o555)
    r.out = r.tmp / "locked" / "run"


@row("out-resume-into-a-folder-without-a-run", "holds no pyevo run (no config.yaml)")
def _(r):
    r.out.mkdir()
    (r.out / "notes.txt").write_text("mine")
    r.extra.append("--resume")


# latency cache
@row("cache-a-json-list", "must hold a JSON object (a pyevo latency table), not a list")
def _(r):
    r.cache.write_text("[0.5, 0.7]")


@row("cache-not-json", "is not valid JSON")
def _(r):
    r.cache.write_text('{"half": 0.')


@row("cache-entries-not-numbers", "entry 'a' is 'b', not a finite number")
def _(r):
    r.cache.write_text('{"a": "b"}')


@row("cache-a-folder", "is not a file; move it away")
def _(r):
    r.cache = r.tmp / "cache.json"
    r.cache.mkdir()


@row("cache-under-a-file", "cannot be written")
def _(r):
    (r.tmp / "a_file").write_text("x")
    r.cache = r.tmp / "a_file" / "latency.json"


@row("cache-on-a-path-that-cannot-be-created", "cannot be written: /proc is not writable")
def _(r):
    r.cache = Path("/proc/pyevo-no-such-folder/latency.json")


@row("cache-read-only-folder", "cannot be written")
def _(r):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders (cache-on-a-path-that-cannot-be-created covers the probe)")
    (r.tmp / "locked").mkdir()
    r.cache = r.tmp / "locked" / "latency.json"
    (r.tmp / "locked").chmod(0o555)


@row("file-inception-weights-missing", "evaluate.inception_weights: no file at")
def _(r):
    r.extra.append(f"--set=evaluate.inception_weights={r.tmp / 'pt_inception.pth'}")


@pytest.mark.parametrize("name", list(ROWS))
def test_refused_in_one_line_before_anything_is_written(world, tmp_path, capsys, name):
    setup, message = ROWS[name]
    r = Row(world, tmp_path)
    r.expect_in_line = []
    setup(r)
    before = snapshot(world, tmp_path)
    out_existed = r.out.exists()
    code, err = cli(capsys, r.args())
    assert_one_line(code, err, message)
    for part in r.expect_in_line:
        assert part in err[0], err
    assert snapshot(world, tmp_path) == before  # nothing written, changed or left over (the cache included)
    assert r.out.exists() == out_existed


def test_an_unreadable_image_is_refused_by_name(world, tmp_path, capsys, monkeypatch):
    # Root reads a chmod-000 file, so the permission error is raised where PIL opens the file.
    r = Row(world, tmp_path)
    denied = r.copy_images() / "006.png"
    real_open = Image.open

    def open_image(path, *args, **kwargs):
        if Path(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_image)
    before = snapshot(world, tmp_path)
    code, err = cli(capsys, r.args())
    assert_one_line(code, err, f"cannot read image {denied}: [Errno 13] Permission denied")
    assert "--data-skip-bad" in err[0]
    assert snapshot(world, tmp_path) == before and not r.out.exists()


def test_skipped_and_converted_images_are_counted_in_the_log(world, tmp_path, caplog):
    """--data-skip-bad leaves a corrupt file out and says how many; images of another size, aspect or mode
    are converted, centre-cropped and resized (as pyevo/data.py documents), and the log counts each. (The
    whole CLI going on past a skipped file: tests/test_real_teachers.py.)"""
    from pyevo.config import load_config
    from pyevo.pipeline import load_images
    from pyevo.teacher import load_teacher

    r = Row(world, tmp_path)
    images = r.copy_images()
    (images / "003.png").write_bytes(b"not an image")
    Image.fromarray(np.full((10, 20, 3), 255, dtype=np.uint8)).save(images / "wide_rgb.png")  # RGB, 20x10
    config = load_config(None, {**TOY, "teacher": r.teacher, "data": str(images), "data_skip_bad": True})
    teacher, scheduler = load_teacher(r.teacher)
    with caplog.at_level("INFO", logger="pyevo.data"):
        train, heldout, reference, _ = load_images(config, teacher, scheduler)
    line = next(m for m in caplog.messages if "images read" in m)
    # 11 files: 10 read (one of them wide and RGB), 1 skipped; every image, 12x12 or 10x10 once cropped, resized.
    assert "10 images read (1 converted, 1 cropped, 10 resized), 1 unreadable skipped" in line, line
    assert any("skipped: cannot read image" in m and "003.png" in m for m in caplog.messages)
    assert len(reference) == 10 and reference.images.shape[1:] == (1, 8, 8)
    # the white 20x10 RGB image: grey, square, 8x8, all at +1
    assert (reference.images == 1).all(dim=(1, 2, 3)).sum() == 1


# --- a full disk while writing (simulated) ------------------------------------------------------------
def _fail_fsync_of(monkeypatch, name: str) -> list[str]:
    """Make ``os.fsync`` fail with ENOSPC for files whose name holds ``name`` (the atomic writer syncs its
    temporary before renaming it), as a full disk fails a write; returns the names it failed."""
    real_fsync, failed = os.fsync, []

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if name in Path(target).name:
            failed.append(target)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def test_a_full_disk_writing_the_atomic_writer_keeps_the_old_file(tmp_path, monkeypatch):
    from pyevo.runfolder import atomic_write_json

    path = tmp_path / "report.json"
    atomic_write_json(path, {"old": 1})
    _fail_fsync_of(monkeypatch, "report.json")
    with pytest.raises(OSError) as raised:
        atomic_write_json(path, {"new": 2})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert json.loads(path.read_text()) == {"old": 1} and sorted(os.listdir(tmp_path)) == ["report.json"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_a_full_disk_at_the_first_write_is_one_line_and_the_cache_is_kept(world, tmp_path, capsys, monkeypatch):
    r = Row(world, tmp_path)
    failed = _fail_fsync_of(monkeypatch, "latency.json")
    code, err = cli(capsys, r.args())
    assert failed
    assert_one_line(code, err, f"cannot write {r.cache}: No space left on device; free some space and ")
    assert json.loads(r.cache.read_text()) == CACHE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.json", "latency.json.lock", "run"]
    # The advice fits the folder: --resume where a run was begun (its config saved), else the same command.
    resumable = (r.out / "config.yaml").is_file()
    assert err[0].endswith("continue with --resume (finished stages are kept)" if resumable else "run again"), err
    assert resumable or not any(r.out.iterdir())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_a_full_disk_in_a_stage_is_one_line_and_resume_finishes_the_run(world, tmp_path, capsys, monkeypatch):
    r = Row(world, tmp_path)
    with monkeypatch.context() as patch:
        failed = _fail_fsync_of(patch, "supernet.safetensors")
        code, err = cli(capsys, r.args())
    assert failed
    assert_one_line(code, err, "supernet.safetensors: No space left on device; free some space and continue with "
                               "--resume (finished stages are kept)")
    assert not (r.out / "supernet.safetensors").exists()
    assert not [p for p in r.out.rglob(".*") if p.is_file()]  # no temporary left behind
    assert (r.out / "config.yaml").is_file()
    code, err = cli(capsys, [*r.args(), "--resume"])
    assert code == 0, err
    assert (r.out / "report.json").is_file() and (r.out / "student").is_dir()
    assert json.loads(r.cache.read_text()).items() > CACHE.items()  # its own timings added, the other run's kept


# --- ops called with bad shapes, dtypes, devices, widths and crops ---------------------------------------
# What tests/test_ops.py and tests/test_population_ops.py (test_misuse_raises_clear_error) do not already
# call: tensors on another device (meta beside cpu: the fake kernels check as the C++ ones do, so a traced
# or compiled call fails like an eager one), zero and negative widths and crops, tensors without channels.
P = torch.ops.pyevo


def _conv(x=None, w=None, b=None, out_channels=4, kernel_size=3, stride=1):
    x = torch.randn(1, 3, 6, 6) if x is None else x
    w = torch.randn(6, 4, 5, 5) if w is None else w
    return P.shared_conv2d(x, w, b, out_channels, kernel_size, stride)


def _norm(x=None, w=None, channels_per_group=2):
    x = torch.randn(2, 6, 4, 4) if x is None else x
    w = torch.randn(8) if w is None else w
    return P.shared_group_norm_silu(x, w, torch.randn(8), channels_per_group, 1e-5)


def _attention(hs=None, ehs=None, q_w=None, heads=2, head_dim=3):
    hs = torch.randn(2, 5, 6) if hs is None else hs
    kv_w = torch.randn(9, 6 if ehs is None else ehs.shape[-1])
    q_w = torch.randn(9, 6) if q_w is None else q_w
    return P.shared_attention(hs, ehs, q_w, None, kv_w, None, kv_w, None, torch.randn(6, 9), None, heads, head_dim)


META = "meta"
OP_ROWS = {
    "conv-input-on-another-device": (lambda: _conv(x=torch.randn(1, 3, 6, 6, device=META)),
                                     "weight is on cpu but input is on meta; all tensor arguments must be on the same device"),
    "conv-weight-on-another-device": (lambda: _conv(w=torch.randn(6, 4, 5, 5, device=META)),
                                      "weight is on meta but input is on cpu"),
    "conv-bias-dtype-on-meta": (lambda: _conv(x=torch.randn(1, 3, 6, 6, device=META),
                                              w=torch.randn(6, 4, 5, 5, device=META),
                                              b=torch.randn(6, device=META, dtype=torch.float64)),
                                "bias has dtype torch.float64 but input has dtype torch.float32"),
    "conv-zero-width": (lambda: _conv(out_channels=0), "out_channels must be >= 1, got 0"),
    "conv-negative-crop": (lambda: _conv(kernel_size=-1), "kernel_size must be odd and >= 1, got -1"),
    "conv-zero-crop": (lambda: _conv(kernel_size=0), "kernel_size must be odd and >= 1, got 0"),
    "conv-negative-stride": (lambda: _conv(stride=-1), "stride must be >= 1, got -1"),
    "conv-input-without-channels": (lambda: _conv(x=torch.randn(1, 0, 6, 6)), "input has no channels"),
    "conv-bool-tensors": (lambda: _conv(x=torch.ones(1, 3, 6, 6, dtype=torch.bool),
                                        w=torch.ones(6, 4, 5, 5, dtype=torch.bool)), "must be a floating-point tensor"),
    "norm-input-on-another-device": (lambda: _norm(x=torch.randn(2, 6, 4, 4, device=META)),
                                     "weight is on cpu but input is on meta"),
    "norm-input-wider-than-the-weight": (lambda: _norm(x=torch.randn(2, 10, 4, 4)),
                                         "weight has 8 entries but the input has 10 channels"),
    "norm-negative-group-width": (lambda: _norm(channels_per_group=-1), "channels_per_group must be >= 1, got -1"),
    "norm-input-without-channels": (lambda: _norm(x=torch.randn(2, 0, 4, 4)), "input has no channels"),
    "attention-input-on-another-device": (lambda: _attention(hs=torch.randn(2, 5, 6, device=META)),
                                          "q_weight is on cpu but hidden_states is on meta"),
    "attention-zero-heads": (lambda: _attention(heads=0), "heads must be >= 1, got 0"),
    "attention-zero-head-width": (lambda: _attention(head_dim=0), "head_dim must be >= 1, got 0"),
    "attention-input-width": (lambda: _attention(hs=torch.randn(2, 5, 7)),
                              "q_weight has 6 input features but its input has 7 channels"),
    "attention-encoder-states-rank": (lambda: _attention(ehs=torch.randn(4, 6)),
                                      "encoder_hidden_states must be 3-D"),
    "population-conv-input-on-another-device": (
        lambda: P.population_conv2d([torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6, device=META)],
                                    torch.randn(6, 4, 3, 3), None, [], [4, 4], [3, 1], 1),
        "inputs[1] is on meta but inputs[0] is on cpu"),
    "population-norm-input-on-another-device": (
        lambda: P.population_group_norm_silu([torch.randn(2, 4, 3, device=META)], torch.randn(8), torch.randn(8), 2,
                                             1e-5),
        "weight is on cpu but inputs[0] is on meta"),
    "population-attention-input-on-another-device": (
        lambda: P.population_attention([torch.randn(2, 5, 6, device=META)], torch.randn(8, 6), None,
                                       torch.randn(8, 6), None, torch.randn(8, 6), None, torch.randn(6, 8), None,
                                       [1, 2], 4),
        "q_weight is on cpu but hidden_states[0] is on meta"),
}


@pytest.mark.parametrize("name", list(OP_ROWS))
def test_ops_refuse_bad_arguments_naming_them(name):
    call, message = OP_ROWS[name]
    with pytest.raises(RuntimeError) as raised:
        call()
    assert message in str(raised.value).splitlines()[0], str(raised.value)
