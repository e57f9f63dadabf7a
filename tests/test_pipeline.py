"""The whole pipeline at toy sizes: report contents, export, determinism, resume, user errors."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from toy_pipeline import TOY
from diffusers import UNet2DModel

from pyevo.config import load_config
from pyevo.pipeline import run


@pytest.fixture(scope="module")
def teacher_folder(tiny_teacher):
    """A small random digits-shaped teacher (tests/conftest.py)."""
    return tiny_teacher


def toy_config(teacher_folder, out, cache, **extra):
    return load_config(None, {**TOY, "teacher": str(teacher_folder), "out": str(out),
                              "latency.cache": str(cache), **extra})


@pytest.fixture(scope="module")
def finished_run(teacher_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    config = toy_config(teacher_folder, root / "a", root / "latency.json")
    return root, config, run(config, progress=False)


def test_report_holds_what_the_issue_asks(finished_run):
    root, config, report = finished_run
    stored = json.loads((root / "a" / "report.json").read_text())
    assert stored["student"]["genome"] == report["student"]["genome"]
    for side in ("teacher", "student"):
        for key in ("macs", "params", "latency_ms", "fd", "class_coverage"):
            assert stored[side][key] is not None, (side, key)
        assert abs(sum(stored[side]["class_coverage"]) - 1) < 1e-6
    for key in ("latency_estimate_ms", "psnr_vs_teacher", "ssim_vs_teacher", "class_agreement", "genome"):
        assert key in stored["student"]
    for key in ("device", "dtype", "batch", "seed"):
        assert stored[key] == getattr(config, key)
    assert set(stored["stages"]) == {"distill", "search", "select", "retrain", "evaluate"}
    assert all(stage["seconds"] >= 0 for stage in stored["stages"].values())
    for name in ("pareto_fronts.png", "losses.png", "samples.png"):
        assert (root / "a" / "plots" / name).stat().st_size > 1000
    assert (root / "a" / "report.md").read_text().startswith("# pyevo run report")
    assert (root / "a" / "config.yaml").is_file()


def test_student_meets_the_cost_caps_and_block_costs_add_up(finished_run):
    root, config, report = finished_run
    selected = json.loads((root / "a" / "select.json").read_text())
    ratios = report["ratios"]
    assert ratios["macs"] <= config.search.max_macs and ratios["params"] <= config.search.max_params
    # The selection's estimate (stem + per-block costs) is the exported student's measured cost.
    assert selected["macs_ratio"] == pytest.approx(ratios["macs"], rel=1e-9)
    assert selected["params_ratio"] == pytest.approx(ratios["params"], rel=1e-9)


def test_latency_estimates_are_reported_against_the_same_timings(finished_run):
    root, config, report = finished_run
    teacher, student = report["teacher"], report["student"]
    blocks = set(report["blocks"])
    assert set(teacher["blocks_ms"]) == set(student["blocks_ms"]) == blocks
    for side in (teacher, student):
        assert side["stem_ms"] > 0 and side["unaccounted_ms"] == pytest.approx(
            side["latency_ms"] - side["stem_ms"] - sum(side["blocks_ms"].values()))
    # The per-block estimate: the student's own stem plus its blocks, from one timing session.
    assert student["latency_estimate_ms"] == pytest.approx(student["stem_ms"] + sum(student["blocks_ms"].values()))
    assert student["latency_estimate_error"] == pytest.approx(
        student["latency_estimate_ms"] / student["latency_ms"] - 1)
    selected = json.loads((root / "a" / "select.json").read_text())
    selection = report["selection"]
    assert selection["latency_ratio_estimate"] == pytest.approx(
        selected["latency_estimate_ms"] / selected["teacher_ms"])
    assert selection["latency_ratio_error"] == pytest.approx(
        selection["latency_ratio_estimate"] / report["ratios"]["latency"] - 1)
    text = (root / "a" / "report.md").read_text()
    assert "latency at selection" in text
    # Both runtimes' whole networks, the run's (lean by default) the measured latency.
    for side in (teacher, student):
        assert side["runtime"] == "lean" and side["runtimes_ms"]["lean"] == side["latency_ms"]
    eager = f"| {teacher['runtimes_ms']['eager']:.3f} | {student['runtimes_ms']['eager']:.3f} |"
    assert "latency, measured (ms, lean runtime)" in text and "eager runtime" in text and eager in text


def test_block_timer_keeps_ratios_to_the_teacher_block_and_scales_them_by_this_runs_reference(
        teacher_folder, tmp_path):
    from pyevo.latency import LatencyTable
    from pyevo.pipeline import BlockTimer
    from pyevo.space import unet_space
    from pyevo.supernet import build_supernet
    from pyevo.teacher import load_teacher

    config = toy_config(teacher_folder, tmp_path / "out", tmp_path / "latency.json")
    teacher, _ = load_teacher(config.teacher)
    spaces = {space.name: space for space in unet_space(teacher)}
    table = LatencyTable(tmp_path / "latency.json", "cpu", config.dtype, config.batch, "toy", setup="modules,threads2")
    timer = BlockTimer(config, teacher, build_supernet(teacher), spaces, table)
    name, space = next(iter(spaces.items()))
    timer.reference_ms = {name: 8.0}
    assert timer(name, space.teacher_genome()) == 8.0  # the reference itself, never timed
    assert table.get(name, space.encode(space.teacher_genome())) is None

    smallest = space.minimal_genome()
    table.put(name, space.encode(smallest), 0.25)
    assert timer(name, smallest) == 2.0  # a stored ratio times this run's teacher block
    timer.reference_ms = {name: 40.0}  # the same table on a machine running 5x slower
    assert timer(name, smallest) == 10.0

    other = next(g for g in (space.largest_genome(), space.narrow_genome(), space.smallest_genome())
                 if space.encode(g) not in (space.encode(smallest), space.encode(space.teacher_genome())))
    ms = timer(name, other)  # not stored: timed in turn with the teacher block, the ratio stored
    ratio = table.get(name, space.encode(other))
    assert ratio > 0 and ms == pytest.approx(ratio * 40.0)


def test_same_seed_same_genomes_and_resume_skips_every_stage(finished_run, teacher_folder):
    root, config, report = finished_run
    again = run(toy_config(teacher_folder, root / "b", root / "latency.json"), progress=False)
    assert again["student"]["genome"] == report["student"]["genome"]
    resumed = run(config, resume=True, progress=False)
    assert resumed["student"]["genome"] == report["student"]["genome"]
    assert resumed["stages"] == report["stages"]  # every stage read back, none re-run


def test_student_loads_in_a_fresh_process_and_samples(finished_run):
    root, _, _ = finished_run
    script = textwrap.dedent(f"""
        import torch, pyevo
        from diffusers import DDIMPipeline, DDIMScheduler
        student = pyevo.StudentUNet2DModel.from_pretrained({str(root / "a" / "student")!r})
        pipe = DDIMPipeline(unet=student, scheduler=DDIMScheduler(num_train_timesteps=100))
        images = pipe(batch_size=2, num_inference_steps=3, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
        print(student.config.genome)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((root / "a" / "report.json").read_text())
    assert out.stdout.strip().splitlines()[-1] == report["student"]["genome"]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pyevo.search", "--quiet", *args], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, cwd=cwd)


def _toy_flags():
    return [f"--set={key}={value}" for key, value in TOY.items()]


@pytest.mark.parametrize("args, message", [
    (["--teacher", "/nonexistent/teacher"], "teacher folder not found: /nonexistent/teacher"),
    (["--set", "distill.stepz=3"], "unknown config key 'distill.stepz'"),
    (["--budget", "1.7", "--rule", "budget"], "search.budget must be in (0, 1]"),
    (["--rule", "fastest"], "search.rule must be one of"),
])
def test_user_errors_end_in_one_line(tmp_path, args, message):
    out = cli("--out", str(tmp_path / "run"), *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("pyevo.search: error: ") and message in lines[-1], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_unsupported_teacher_and_impossible_budget(tmp_path, teacher_folder):
    not_unet = tmp_path / "not_unet"
    not_unet.mkdir()
    (not_unet / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    out = cli("--teacher", str(not_unet), "--out", str(tmp_path / "r1"))
    assert out.returncode == 2 and "holds a AutoencoderKL; pyevo supports UNet2DModel" in out.stderr
    assert not (tmp_path / "r1").exists()

    out = cli("--teacher", str(teacher_folder), "--out", str(tmp_path / "r2"), "--rule", "budget",
              "--budget", "0.001", f"--set=latency.cache={tmp_path / 'lat.json'}", *_toy_flags())
    assert out.returncode == 2 and "is impossible: the fastest student takes" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "r2").exists()

    out = cli("--teacher", str(teacher_folder), "--out", str(tmp_path / "r3"), "--set=search.max_params=0.01",
              f"--set=latency.cache={tmp_path / 'lat.json'}", *_toy_flags())
    assert out.returncode == 2 and "are impossible: the smallest student has" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "r3").exists()


def test_a_used_folder_needs_resume(finished_run, teacher_folder):
    root, _, _ = finished_run
    out = cli("--teacher", str(teacher_folder), "--out", str(root / "a"), *_toy_flags())
    assert out.returncode == 2 and "is not empty; pass --resume" in out.stderr


def test_kid_ratio_only_where_both_kids_stand_clear_of_zero():
    from pyevo.report import _kid_ratio

    assert _kid_ratio({"kid_mean": 0.2, "kid_std": 0.05}, {"kid_mean": 0.1, "kid_std": 0.02}) == pytest.approx(0.5)
    assert _kid_ratio({"kid_mean": 2.3, "kid_std": 62.0}, {"kid_mean": -35.0, "kid_std": 42.0}) is None
    assert _kid_ratio({"kid_mean": None, "kid_std": None}, {"kid_mean": 0.1, "kid_std": 0.0}) is None


def test_run_folder_errors_end_in_one_line_before_anything_is_written(tmp_path):
    out = cli("--out", str(tmp_path / "never_ran"), "--resume")
    assert out.returncode == 2 and "--resume: there is no run in" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "never_ran").exists()
    (tmp_path / "a_file").write_text("x")
    for target, message in ((tmp_path / "a_file", "is a file, not a folder"),
                            (tmp_path / "a_file" / "run", "is not a folder")):
        out = cli("--out", str(target))
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 2 and last.startswith("pyevo.search: error: ") and message in last, out.stderr
        assert "Traceback" not in out.stderr
    assert (tmp_path / "a_file").read_text() == "x"


def test_resume_re_runs_a_stage_whose_artifact_or_result_is_damaged_and_ends_the_same(finished_run, tmp_path,
                                                                                      caplog):
    import shutil

    root, config, report = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(root / "a", copy)
    copied = load_config(None, {**config.to_dict(), "out": str(copy)} | {})
    supernet = copy / "supernet.safetensors"
    supernet.write_bytes(supernet.read_bytes()[: supernet.stat().st_size // 2])  # half a file
    (copy / "evaluate.json").write_text((copy / "evaluate.json").read_text()[:50])  # half a JSON
    with caplog.at_level("WARNING", logger="pyevo.pipeline"):
        resumed = run(copied, resume=True, progress=False)
    assert "stage distill: supernet.safetensors is missing or damaged; running the stage again" in caplog.text
    assert f"stage evaluate: {copy / 'evaluate.json'} is damaged" in caplog.text
    assert resumed["student"]["genome"] == report["student"]["genome"]
    assert resumed["student"]["macs"] == report["student"]["macs"]
    # Results are written with the user's usual mode, not a temporary file's 0600.
    assert (copy / "evaluate.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    for path in [copy / "student", *(copy / "student").rglob("*")]:  # the swapped-in folder too
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~_umask(), path


def test_a_teacher_changed_in_place_re_runs_what_depends_on_it(teacher_folder, tmp_path, caplog):
    import shutil

    import torch

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_folder, teacher)
    config = toy_config(teacher, tmp_path / "run", tmp_path / "latency.json")
    run(config, progress=False)
    unet = UNet2DModel.from_pretrained(teacher / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.01)
    unet.save_pretrained(teacher / "unet")
    with caplog.at_level("INFO", logger="pyevo.pipeline"):
        run(config, resume=True, progress=False)
    assert "stage distill: done already" not in caplog.text  # same name, other weights: not reused


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_names_the_config_keys_that_differ_from_the_saved_run(finished_run, tmp_path, caplog):
    """A change that touches only later stages re-runs them (the log names the key and the stages); a
    change the distillation depends on is refused in one line naming the keys, before anything is written."""
    import shutil

    from pyevo.pipeline import RunError, config_changes

    root, config, report = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(root / "a", copy)
    before = {path: path.read_bytes() for path in sorted(copy.rglob("*")) if path.is_file()}
    for change, named in (({"distill.steps": 3}, "distill.steps (2 -> 3)"), ({"seed": 1}, "seed (0 -> 1)"),
                          ({"distill.lr": 0.01, "retrain.lr": 0.01}, "distill.lr (0.001 -> 0.01)")):
        refused = load_config(None, {**config.to_dict(), "out": str(copy), **change})
        with pytest.raises(RunError, match=r"^--resume: .*differ from the run's saved config") as error:
            run(refused, resume=True, progress=False)
        assert named in str(error.value) and "\n" not in str(error.value)
        assert "retrain.lr" not in str(error.value)  # only the keys that refuse are named
    assert {path: path.read_bytes() for path in sorted(copy.rglob("*")) if path.is_file()} == before

    # How often a stage checkpoints itself is in no stage's key: not even named.
    changed = load_config(None, {**config.to_dict(), "out": str(copy), "search.slack": 3.0,
                                 "distill.checkpoint_every": 1, "retrain.checkpoint_every": 7})
    with caplog.at_level("INFO", logger="pyevo.pipeline"):
        run(changed, resume=True, progress=False)
    assert "--resume: search.slack was 2.0, now 3.0: select, retrain, evaluate run again" in caplog.text
    assert "--resume: out was" not in caplog.text  # a moved folder changes no stage
    assert "checkpoint_every" not in caplog.text
    assert "stage distill: done already" in caplog.text and "stage search: done already" in caplog.text
    assert "stage select: done already" not in caplog.text
    assert config_changes({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "c": 2}) == [("a.b", 1, 2)]


def test_stages_keys_say_where_a_config_key_first_matters():
    from pyevo.config import RunConfig, describe_keys
    from pyevo.pipeline import first_stage

    config = RunConfig()
    assert first_stage("retrain.lr", config) == "retrain" and first_stage("search.max_macs", config) == "select"
    assert first_stage("search.generations", config) == "search" and first_stage("batch", config) == "search"
    assert first_stage("evaluate.num_samples", config) == "evaluate"
    assert first_stage("latency.network_repeats", config) == "evaluate"
    assert first_stage("teacher", config) == first_stage("distill.steps", config) == "distill"
    # The held-out size splits an image folder (and sizes a data-free set): the training images follow it.
    assert first_stage("search.heldout_size", config) == "search"
    config.data = "data-free"
    assert first_stage("search.heldout_size", config) == "distill"
    assert first_stage("guidance_scale", config) is None and first_stage("guidance_scale", config, True) == "distill"
    for key in ("out", "distributed.timeout", "distill.checkpoint_every", "retrain.checkpoint_every"):
        assert first_stage(key, config) is None
    # Every key has a stage (or none on purpose): a new key defaults to refusing, the safe side.
    assert {first_stage(key, config) for key, _, _ in describe_keys()} <= {None, "distill", "search", "select",
                                                                             "retrain", "evaluate"}


def test_a_hand_picked_genome_is_retrained_from_the_runs_search_and_until_stops_early(finished_run, tmp_path):
    """``search.genome`` replaces the rule's picks (scored as the search scores where it did not evaluate
    them), the distillation and search are read back, and ``run(until=...)`` stops after the selection or
    the retraining; a genome that breaks the caps, or is not of this teacher's space, is refused before
    anything is written."""
    import shutil

    from pyevo.config import ConfigError
    from pyevo.search.select import BudgetError
    from pyevo.space import decode_network, encode_network, unet_space
    from pyevo.student import load_student
    from pyevo.teacher import load_teacher

    root, config, report = finished_run
    spaces = unet_space(load_teacher(config.teacher)[0])
    narrow = encode_network({s.name: s.narrow_genome() for s in spaces}, spaces)
    assert narrow != json.loads((root / "a" / "select.json").read_text())["genome"]
    copy = tmp_path / "copy"
    shutil.copytree(root / "a", copy)
    for stale in ("retrain.json", "evaluate.json", "report.json", "student"):
        shutil.rmtree(copy / stale) if (copy / stale).is_dir() else (copy / stale).unlink()
    picked = load_config(None, {**config.to_dict(), "out": str(copy), "search.genome": narrow,
                                "search.max_macs": 1.0, "search.max_params": 1.0})
    assert run(picked, resume=True, progress=False, until="select") is None
    selected = json.loads((copy / "select.json").read_text())
    assert selected["rule"] == "genome" and selected["genome"] == narrow
    searched = json.loads((root / "a" / "search.json").read_text())
    for name, block in selected["blocks"].items():
        evaluated = {c["genome"]: c for c in searched["blocks"][name]["evaluated"]}
        if block["genome"] in evaluated:  # the search's own figures where it has them
            assert block["nsr"] == evaluated[block["genome"]]["nsr"]
        assert block["nsr"] > 0 and block["latency_ms"] > 0
    assert not (copy / "retrain.json").exists()
    assert run(picked, resume=True, progress=False, until="retrain") is None
    assert not (copy / "evaluate.json").exists()
    student = load_student(copy / "student")
    assert decode_network(student.config.genome, spaces) == decode_network(narrow, spaces)

    fresh = tmp_path / "fresh"
    over = load_config(None, {**config.to_dict(), "out": str(fresh), "search.genome": narrow,
                              "search.max_macs": 0.3})
    with pytest.raises(BudgetError, match="search.genome has .* over the caps"):
        run(over, progress=False)
    wrong = load_config(None, {**config.to_dict(), "out": str(fresh), "search.genome": "mid_block=r0:skip"})
    with pytest.raises(ConfigError, match="^search.genome: "):
        run(wrong, progress=False)
    assert not fresh.exists()
