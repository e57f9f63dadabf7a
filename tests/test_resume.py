"""Kill a run anywhere, resume it, and it ends as the uninterrupted run (issue 14, resume).

Every run here is the CLI (``pyevo.search.__main__.main``) in a process of its own, SIGKILLed from inside
at a point drawn from a seeded RNG: the k-th training step of the distillation or the retraining (a
k between two checkpoints, on one), the k-th candidate the search scores, the selection, the teacher's or
the student's evaluation samples or their timing, the report's plots. Killing from inside, at a named
point, makes the test exact: each kill lands where it was drawn, never a moment earlier or later. The
processes are forked from one that imported pyevo once (a "zygote"; each fork then runs the CLI, sees
SIGKILL and leaves no clean-up behind), so that a dozen runs fit in the test's time; the SIGINT test runs
``python -m pyevo.search`` itself. Each chain of kills and resumes is compared with one uninterrupted run
of the same seed: the same candidates and genomes, the same weights and figures within float tolerance,
and, within the chain, every candidate's latency on the one scale of the run's recorded teacher timings.
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from toy_pipeline import TOY

# Long enough for checkpoints inside each stage (every 2 of 6 steps, 3 generations). The selection is the
# paper's rule with a wide slack (each block's fastest candidate within 10 x the teacher-shaped NSR) and no
# caps: per block, it reads latencies only as ratios to the teacher block's, which the shared latency table
# gives every run alike (the caps weigh latencies across blocks, on each run's own teacher timings).
FLAGS = {**TOY, "distill.steps": 6, "distill.checkpoint_every": 2, "retrain.steps": 6, "retrain.checkpoint_every": 2,
         "search.generations": 3, "search.slack": 10, "search.max_macs": 1, "search.max_params": 1}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

ZYGOTE = textwrap.dedent('''
    """Imports pyevo once, then for each job read from stdin (JSON: argv, kill, log) forks a process that
    runs the CLI with its output in the log file and SIGKILLs itself at the job's kill point; answers
    each job with its exit status (negative: the signal)."""
    import json, os, signal, sys, traceback

    import torch

    torch.set_num_threads(1)
    import pyevo.distill, pyevo.pipeline, pyevo.report, pyevo.retrain
    from pyevo.search.__main__ import main


    def arm(kill):
        """Kill this process at ``stage:count``: the count-th (from 0) call of the stage's marker."""
        if not kill:
            return
        stage, _, count = kill.partition(":")
        calls = [0]

        def tick(*args, **kwargs):
            if calls[0] == int(count or 0):
                os.kill(os.getpid(), signal.SIGKILL)
            calls[0] += 1

        def before(module, name, when=lambda *a, **k: True):
            original = getattr(module, name)

            def hooked(*args, **kwargs):
                if when(*args, **kwargs):
                    tick()
                return original(*args, **kwargs)

            setattr(module, name, hooked)

        if stage in ("distill", "retrain"):  # the count-th training step, before it draws its batch
            before(getattr(pyevo, stage), "noisy_batch")
        elif stage == "search":  # the count-th candidate scored (its latency looked up)
            before(pyevo.pipeline.BlockTimer, "__call__")
        elif stage == "select":
            before(pyevo.pipeline, "meet_cost_caps")
        elif stage == "evaluate":  # 0: the teacher's samples, 1: the student's
            before(pyevo.pipeline, "sample_images")
        elif stage == "evaluate-latency":  # timing teacher and student, their samples drawn
            before(pyevo.pipeline, "network_latency", lambda networks, *a, **k: "student" in networks)
        elif stage == "report":  # the report's second plot, its first written
            before(pyevo.report, "_plot_losses")
        else:
            raise SystemExit(f"unknown kill point {kill}")


    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(log, 1)
                os.dup2(log, 2)
                arm(job.get("kill"))
                code = main(job["argv"])
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)
''')


class Zygote:
    def __init__(self, folder):
        (folder / "zygote.py").write_text(ZYGOTE)
        self.process = subprocess.Popen([sys.executable, str(folder / "zygote.py")], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=ENV)
        self.count = 0
        self.folder = folder

    def cli(self, *argv, kill=""):
        """Run the CLI with ``argv`` in a fresh fork; (exit status, its output)."""
        self.count += 1
        log = self.folder / f"run{self.count}.log"
        self.process.stdin.write(json.dumps({"argv": list(argv), "kill": kill, "log": str(log)}) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, "the zygote died"
        return json.loads(answer)["exit"], log.read_text()

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_teacher):
    folder = tmp_path_factory.mktemp("resume")
    zygote = Zygote(folder)
    yield folder, zygote, tiny_teacher
    zygote.close()


def fresh(root, out):
    """The flags of a fresh run into ``out`` (every run here shares one latency table)."""
    folder, _, teacher = root
    values = {**FLAGS, "latency.cache": str(folder / "latency.json")}
    return ["--teacher", str(teacher), "--out", str(out), *(f"--set={key}={value}" for key, value in values.items())]


@pytest.fixture(scope="module")
def reference(root):
    """The uninterrupted run (its timings fill the shared latency table every later run reads)."""
    folder, zygote, _ = root
    code, log = zygote.cli(*fresh(root, folder / "reference"))
    assert code == 0, log[-3000:]
    return folder / "reference"


def evaluations(folder):
    return sum(len(block["evaluated"]) for block in read(folder, "search.json")["blocks"].values())


def read(folder, name):
    return json.loads((folder / name).read_text())


def tensors(path):
    return safetensors.torch.load_file(path)


def assert_close(ours, theirs, tol=1e-6):
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-5, atol=tol), key


def assert_same_run(folder, reference):
    report, expected = read(folder, "report.json"), read(reference, "report.json")
    assert report["student"]["genome"] == expected["student"]["genome"]
    assert expected["ratios"]["macs"] < 0.9  # a student, not the teacher's own shape
    figures = ("macs", "params", "fd", "kid_mean", "kid_std", "psnr_vs_teacher", "ssim_vs_teacher",
               "class_agreement")
    for side in ("teacher", "student"):
        for key in figures:
            if key in expected[side]:
                assert report[side][key] == pytest.approx(expected[side][key], rel=1e-4, abs=1e-6), (side, key)
        assert report[side]["class_coverage"] == pytest.approx(expected[side]["class_coverage"], abs=1e-6)
    # Every block's candidates, not only the picks; their latencies as ratios to the teacher block's, which
    # the shared latency table gives both runs alike, and, in this run, on one scale: its recorded timings.
    searched, expected_search = read(folder, "search.json")["blocks"], read(reference, "search.json")["blocks"]
    timings = read(folder, "timings.json")
    for name, block in expected_search.items():
        ours = searched[name]
        assert [c["genome"] for c in ours["evaluated"]] == [c["genome"] for c in block["evaluated"]], name
        assert [c["nsr"] for c in ours["evaluated"]] == pytest.approx([c["nsr"] for c in block["evaluated"]],
                                                                      rel=1e-5)
        assert ours["teacher"]["latency_ms"] == timings["blocks_ms"][name]
        assert [c["latency_ms"] / ours["teacher"]["latency_ms"] for c in ours["evaluated"]] == pytest.approx(
            [c["latency_ms"] / block["teacher"]["latency_ms"] for c in block["evaluated"]], rel=1e-9), name
    assert_close(tensors(folder / "supernet.safetensors"), tensors(reference / "supernet.safetensors"))
    weights = "student/diffusion_pytorch_model.safetensors"
    assert_close(tensors(folder / weights), tensors(reference / weights))
    for stage in ("distill", "retrain"):
        ours, theirs = read(folder, f"{stage}.json")["history"], read(reference, f"{stage}.json")["history"]
        assert [sorted(r) for r in ours] == [sorted(r) for r in theirs], stage
        for mine, one in zip(ours, theirs):
            assert [mine[k] for k in sorted(one)] == pytest.approx([one[k] for k in sorted(one)], rel=1e-5), stage
    # The mid-stage checkpoints are gone once their stages finished.
    assert not (folder / "checkpoints").exists() and not (folder / "search").exists()


def kill_plan(seed, reference):
    """Where each run of a chain dies, drawn from ``seed``: inside every stage, in turn."""
    rng = random.Random(seed)
    plan = [f"distill:{rng.randrange(1, FLAGS['distill.steps'])}",
            f"search:{rng.randrange(evaluations(reference))}"]
    if seed % 2 == 0:
        plan.append("select:0")
    plan += [f"retrain:{rng.randrange(1, FLAGS['retrain.steps'])}",
             rng.choice(["evaluate:0", "evaluate:1", "evaluate-latency:0"])]
    if seed % 2 == 1:
        plan.append("report:0")
    return plan


def checkpoint_steps(folder, stage):
    return sorted(int(p.stem.split("_")[1]) for p in (folder / "checkpoints" / stage).glob("step_*.json"))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_run_killed_in_every_stage_resumes_to_the_uninterrupted_run(root, reference, seed):
    folder, zygote, _ = root
    out = folder / f"chain{seed}"
    plan = kill_plan(seed, reference)
    code, log = zygote.cli(*fresh(root, out), kill=plan[0])
    assert code == -signal.SIGKILL, log[-3000:]
    for kill in [*plan[1:], ""]:
        stage, _, count = kill.partition(":")
        expected_log = None
        if seed == 0 and not (out / "distill.json").exists():
            # The newest distillation checkpoint damaged: the one before it (or none) is used.
            steps = checkpoint_steps(out, "distill")
            if steps:
                newest = out / "checkpoints" / "distill" / f"step_{steps[-1]:08d}.pt"
                newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
                expected_log = f"checkpoint {newest} is missing or damaged"
        if seed == 1 and (out / "search").is_dir() and not (out / "search.json").exists():
            generations = sorted((out / "search").rglob("gen_*.json"))
            if len(generations) > 1:  # a damaged generation checkpoint: the generation before it is used
                generations[-1].write_text(generations[-1].read_text()[:40])
                expected_log = f"the search checkpoint {generations[-1]} is damaged"
        before = {name: checkpoint_steps(out, name) for name in ("distill", "retrain")}
        # --resume with the run folder alone: the saved config is the run's.
        code, log = zygote.cli("--out", str(out), "--resume", kill=kill)
        assert code == (-signal.SIGKILL if kill else 0), f"{kill}: {log[-3000:]}"
        if expected_log:
            assert expected_log in log, log[-3000:]
        for name, steps in before.items():  # a stage that had a checkpoint went on from its newest good one
            if steps and not expected_log:
                assert f"resuming from the checkpoint after step {steps[-1]}" in log, log[-3000:]
        assert "the teacher is timed again" not in log and "Traceback" not in log
    assert_same_run(out, reference)


def test_sigint_ends_a_run_in_one_line_and_the_folder_resumes(root, reference):
    """``python -m pyevo.search`` itself, interrupted (Ctrl-C) once its distillation wrote a checkpoint."""
    folder, zygote, _ = root
    out = folder / "interrupted"
    # Ctrl-C's default disposition in the child: a test run from a background job (`cmd &` in a script)
    # inherits SIGINT ignored, and a Python started so installs no KeyboardInterrupt handler.
    process = subprocess.Popen([sys.executable, "-m", "pyevo.search", *fresh(root, out)], stderr=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=ENV,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "checkpoint after step 2 written" in line:
            process.send_signal(signal.SIGINT)
            break
    rest = process.communicate(timeout=300)[1]
    errors = "".join(lines) + rest
    assert process.returncode == 130, errors[-3000:]
    assert errors.strip().splitlines()[-1] == ("pyevo.search: interrupted; finished stages and the last checkpoint "
                                              "are kept, continue with --resume")
    assert "Traceback" not in errors
    assert not (out / "distill.json").exists() and checkpoint_steps(out, "distill")[0] == 2
    code, log = zygote.cli("--out", str(out), "--resume")
    assert code == 0, log[-3000:]
    assert "resuming from the checkpoint after step" in log
    assert_same_run(out, reference)


def test_resume_refuses_a_change_the_distillation_depends_on_before_writing_anything(root, reference):
    _, zygote, _ = root
    before = {path: path.stat().st_mtime_ns for path in reference.rglob("*")}
    code, log = zygote.cli("--quiet", "--out", str(reference), "--resume", "--set=distill.lr=0.01", "--set=seed=3")
    assert code == 2, log[-3000:]
    lines = log.strip().splitlines()
    assert lines == [f"pyevo.search: error: --resume: distill.lr (0.001 -> 0.01), seed (0 -> 3) differ from the run's "
                     f"saved config ({reference / 'config.yaml'}), and its supernet was distilled with the saved "
                     "values: resume with those, or start a new run with another --out"], log
    assert {path: path.stat().st_mtime_ns for path in reference.rglob("*")} == before


def test_step_checkpoints_pass_over_damaged_and_foreign_ones(tmp_path, caplog):
    from pyevo.training import StepCheckpoints

    checkpoints = StepCheckpoints(tmp_path / "c", "key", 2)
    assert [done for done in range(1, 8) if checkpoints.due(done, 6)] == [2, 4]  # never after the last step
    assert checkpoints.load() is None
    for done in (2, 4, 6):
        checkpoints.save(done, lambda done=done: {"step": done, "w": torch.full((3,), float(done)),
                                                  "rng": random.Random(done).getstate()})
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "step_00000004.json", "step_00000004.pt", "step_00000006.json", "step_00000006.pt"]  # the two newest
    state = checkpoints.load()
    assert state["step"] == 6 and torch.equal(state["w"], torch.full((3,), 6.0))
    assert state["rng"] == random.Random(6).getstate()
    newest = tmp_path / "c" / "step_00000006.pt"
    data = bytearray(newest.read_bytes())
    data[-20] ^= 1  # one flipped bit: same size, another sha256
    newest.write_bytes(bytes(data))
    with caplog.at_level("INFO", logger="pyevo.training"):
        assert checkpoints.load()["step"] == 4
        assert f"checkpoint {newest} is missing or damaged" in caplog.text
        assert StepCheckpoints(tmp_path / "c", "other key", 2).load() is None  # another configuration's
        assert "belongs to another configuration" in caplog.text
        (tmp_path / "c" / "step_00000004.json").write_text("{")
        assert checkpoints.load() is None
        assert "the stage starts from scratch" in caplog.text
    checkpoints.clear()
    assert not (tmp_path / "c").exists()


def test_the_evaluation_resumes_from_the_sample_batches_it_drew(tmp_path):
    """A kill between two batches of a model's samples loses only the batch in progress: the resumed draw
    takes the kept batches as they are, draws the rest, and equals an uninterrupted draw; kept batches of
    another stage key, or a damaged one, are not taken; eta > 0 cannot resume."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from pyevo.pipeline import Stages
    from pyevo.sample import ddim_sample

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    config = DDPMScheduler(num_train_timesteps=100).config

    def sample(done=(), on_batch=None, eta=0.0):
        return ddim_sample(unet, config, 10, steps=3, seed=0, eta=eta, batch_size=4, progress=False, done=done,
                           on_batch=on_batch)

    whole = sample()

    class Killed(Exception):
        pass

    def killed_after_two(done, on_batch):
        def keep_then_die(index, output):
            on_batch(index, output)
            if index == 1:
                raise Killed
        return sample(done, keep_then_die)

    stages = Stages(tmp_path, resume=True)
    stages.key = "evaluate-key"
    with pytest.raises(Killed):
        stages.kept_samples("student", killed_after_two)
    resumed_from = []

    def draw(done, on_batch):
        resumed_from.append(len(done))
        return sample(done, on_batch)

    assert torch.equal(stages.kept_samples("student", draw), whole)
    assert resumed_from == [2]
    assert not (tmp_path / "checkpoints" / "evaluate" / "student.batches").exists()  # folded into the whole file

    with pytest.raises(Killed):
        stages.kept_samples("teacher", killed_after_two)
    batches = tmp_path / "checkpoints" / "evaluate" / "teacher.batches"
    (batches / "00001.safetensors").write_bytes(b"half")  # the second batch damaged: the first is kept
    resumed_from.clear()
    assert torch.equal(stages.kept_samples("teacher", draw), whole) and resumed_from == [1]
    other = Stages(tmp_path, resume=True)
    other.key = "another-key"
    with pytest.raises(Killed):
        other.kept_samples("x", killed_after_two)
    other.key = "a-third-key"
    resumed_from.clear()
    other.kept_samples("x", draw)
    assert resumed_from == [0]
    with pytest.raises(ValueError, match="eta 0"):
        sample(done=[whole[:4]], eta=0.5)
