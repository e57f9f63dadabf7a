"""torchrun: two gloo processes on the CPU give what one process gives; failures end the job.

Every multi-process test launches ``python -m torch.distributed.run --standalone --nproc_per_node 2``
(a free port each time) on a tiny random teacher at toy sizes, through a worker script that can make
one rank fail (killed, hung, raising) and that forbids the ranks other than 0 to write anything under
the test's folder but their own blocks' search generations.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import safetensors.torch
import torch
from toy_pipeline import TOY, save_tiny_teacher
from diffusers import DDPMScheduler

from pyevo.distributed import SINGLE, assign_blocks
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

WORKER = textwrap.dedent('''
    """pyevo.search under torchrun, with one rank made to fail (PYEVO_TEST_FAULT=action:rank:stage) and
    the ranks other than 0 forbidden to write under PYEVO_TEST_GUARD."""
    import builtins, io, os, signal, sys, time

    rank = int(os.environ["RANK"])
    import pyevo.pipeline as pipeline

    import pyevo.search.local as local

    # Every rank says on stderr where its blocks' searches resume (the ranks other than 0 log errors only).
    latest = local._latest_checkpoint

    def announced(folder, block):
        state = latest(folder, block)
        if state is not None:
            print(f"rank {rank} resumes {block} after generation {state['generation']}", file=sys.stderr)
        return state

    local._latest_checkpoint = announced

    fault = os.environ.get("PYEVO_TEST_FAULT")
    if fault:
        action, who, stage = fault.split(":")
        if int(who) == rank and stage == "search":  # killed once its first block's generation 1 is kept
            kept = local._checkpoint

            def checkpoint_then_kill(folder, generation, *args):
                kept(folder, generation, *args)
                if generation == 1:
                    os.kill(os.getpid(), signal.SIGKILL)

            local._checkpoint = checkpoint_then_kill
        elif int(who) == rank:
            name = {"prepare": "prepare", "distill": "distill_supernet", "retrain": "retrain_student"}[stage]
            original = getattr(pipeline, name)

            def faulty(*args, **kwargs):
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if action == "hang":
                    time.sleep(3600)
                if action == "raise":
                    raise pipeline.RunError(f"rank {rank} cannot read its data")
                return original(*args, **kwargs)

            setattr(pipeline, name, faulty)

    root = os.environ.get("PYEVO_TEST_GUARD")
    if root and rank != 0:
        import safetensors.torch

        def guarded(path):
            path = os.path.abspath(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else ""
            # The one thing they may write: their own blocks' search generations, <out>/search/...
            if path.startswith(root) and os.path.relpath(path, root).split(os.sep)[1:2] != ["search"]:
                raise PermissionError(f"rank {rank} wrote {path}")

        def wrap(module, name, writes):
            original = getattr(module, name)

            def check(*args, **kwargs):
                if writes(*args, **kwargs):
                    guarded(args[0] if args else kwargs.get("file") or kwargs.get("filename"))
                return original(*args, **kwargs)

            setattr(module, name, check)

        write_modes = lambda file, mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
        wrap(builtins, "open", write_modes)
        wrap(io, "open", write_modes)
        wrap(os, "open", lambda path, flags, *a, **k: bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
        for name in ("mkdir", "replace", "rename", "unlink", "rmdir"):
            wrap(os, name, lambda *a, **k: True)
        wrap(safetensors.torch, "save_file", lambda tensors, filename, *a, **k: guarded(filename) or False)
        try:  # the guard itself works
            open(os.path.join(root, f"probe{rank}"), "w")
        except PermissionError:
            pass
        else:
            sys.exit("the write guard let a write through")

    from pyevo.search.__main__ import main

    sys.exit(main(sys.argv[1:]))
''')


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    save_tiny_teacher(folder / "teacher")
    (folder / "worker.py").write_text(WORKER)
    return folder


def flags(root, out, **extra):
    values = {**TOY, "latency.cache": str(root / "latency.json"), **extra}
    return ["--quiet", "--teacher", str(root / "teacher"), "--out", str(out),
            *(f"--set={key}={value}" for key, value in values.items())]


def torchrun(root, *args, fault="", timeout=300):
    env = {**ENV, "PYEVO_TEST_GUARD": str(root), "PYEVO_TEST_FAULT": fault}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(root / "worker.py"), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def single(root):
    """One process, no torchrun (here, at one thread, as each torchrun worker runs): the reference.
    Its latency table is the one the ranks read."""
    from pyevo.config import load_config
    from pyevo.pipeline import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(load_config(None, {**TOY, "teacher": str(root / "teacher"), "out": str(root / "single"),
                               "latency.cache": str(root / "latency.json")}), progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "single"


def weights(folder):
    return safetensors.torch.load_file(folder / "student" / "diffusion_pytorch_model.safetensors")


def assert_close_weights(ours, theirs, bound, tol=1e-6, share=1e-3):
    """Equal within float tolerance, as Adam leaves it: its first steps move a weight by about
    lr * g / (|g| + eps), so where a gradient is all but zero (large terms cancelling) its rounding,
    which differs between one full-batch backward and the mean of two half-batch ones, moves the
    weight by up to a fraction of lr. So: all but ``share`` of the weights within ``tol``, and none
    further than ``bound`` (a bug that changes gradients' directions moves most weights by about lr)."""
    assert ours.keys() == theirs.keys()
    diffs = torch.cat([(ours[key] - theirs[key]).abs().flatten() for key in theirs])
    assert float((diffs > tol).double().mean()) <= share and float(diffs.max()) <= bound, (
        f"{int((diffs > tol).sum())} of {diffs.numel()} weights differ by more than {tol}, at most {float(diffs.max())}")


def assert_same_run(folder, reference):
    report, expected = (json.loads((f / "report.json").read_text()) for f in (folder, reference))
    assert report["student"]["genome"] == expected["student"]["genome"]
    searched, expected_search = (json.loads((f / "search.json").read_text()) for f in (folder, reference))
    for name, block in expected_search["blocks"].items():  # every block's candidates, not only the picks
        assert [c["genome"] for c in searched["blocks"][name]["evaluated"]] == [c["genome"] for c in block["evaluated"]]
        assert [c["nsr"] for c in searched["blocks"][name]["evaluated"]] == pytest.approx(
            [c["nsr"] for c in block["evaluated"]], rel=1e-4)
    assert_close_weights(weights(folder), weights(reference), bound=0.5 * 5e-4)  # retrain.lr 5e-4
    supernet = [safetensors.torch.load_file(f / "supernet.safetensors") for f in (folder, reference)]
    assert_close_weights(*supernet, bound=0.5 * 1e-3)  # distill.lr 1e-3
    # The losses of every step, the global batch's under torchrun, are the one-process losses.
    for stage in ("distill", "retrain"):
        ours, theirs = (json.loads((f / f"{stage}.json").read_text())["history"] for f in (folder, reference))
        assert [sorted(r) for r in ours] == [sorted(r) for r in theirs]
        for mine, one in zip(ours, theirs):
            assert [mine[k] for k in sorted(one)] == pytest.approx([one[k] for k in sorted(one)], rel=1e-5), stage
    return report


def test_two_processes_give_one_process_genomes_and_weights_through_a_killed_rank_and_resume(root, single):
    """The issue's check, with a rank killed on the way (inside its first block's search, then in
    retraining): the job ends with an error within a bounded time, and ``--resume`` under torchrun
    resumes every rank's searches from their last generation, reads back what was done, and ends as the
    one-process run."""
    out_dir = root / "two"
    out = torchrun(root, *flags(root, out_dir), fault="kill:1:search", timeout=180)
    assert out.returncode != 0 and not (out_dir / "search.json").exists(), out.stderr[-3000:]
    kept = {path.parent.name for path in (out_dir / "search").glob("*/*/gen_0001.json")}
    assert kept, "rank 1 kept no search generation"
    start = time.monotonic()
    out = torchrun(root, *flags(root, out_dir), "--resume", fault="kill:1:retrain", timeout=180)
    # Rank 1's first block goes on from the generation it kept, not from the start.
    resumed = set(re.findall(r"rank 1 resumes (\S+) after generation 1\b", out.stderr))
    assert resumed and resumed <= kept, out.stderr[-3000:]
    assert out.returncode != 0 and time.monotonic() - start < 120, out.stderr[-3000:]
    assert (out_dir / "search.json").is_file() and not (out_dir / "report.json").exists()
    distilled, searched = ((out_dir / name).read_text() for name in ("distill.json", "search.json"))

    out = torchrun(root, *flags(root, out_dir), "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    # Distillation and the search (both under torchrun) read back, not run again.
    assert [(out_dir / name).read_text() for name in ("distill.json", "search.json")] == [distilled, searched]
    report = assert_same_run(out_dir, single)
    assert report["world_size"] == 2
    assert [rank["rank"] for rank in report["ranks"]] == [0, 1]
    assert all(rank["device"] == "cpu" and rank["device_name"] for rank in report["ranks"])
    # Every block searched once, by the rank the greedy assignment gave it.
    assigned = sorted(name for rank in report["ranks"] for name in rank["blocks"])
    assert assigned == sorted(report["blocks"]) and all(rank["blocks"] for rank in report["ranks"])
    assert "Distributed over 2 processes" in (out_dir / "report.md").read_text()
    one = json.loads((single / "report.json").read_text())
    assert one["world_size"] == 1 and [rank["rank"] for rank in one["ranks"]] == [0]


def test_a_rank_that_hangs_ends_the_job_after_the_timeout(root):
    start = time.monotonic()
    out = torchrun(root, *flags(root, root / "hung", **{"distributed.timeout": 5}), fault="hang:1:distill",
                   timeout=180)
    assert out.returncode != 0 and time.monotonic() - start < 120, out.stderr[-3000:]
    assert "pyevo.search: error: " in out.stderr and "another rank died or stopped answering" in out.stderr
    assert not (root / "hung" / "report.json").exists()


def test_an_error_on_one_rank_ends_every_rank_with_that_error_printed_once(root):
    out = torchrun(root, *flags(root, root / "refused"), fault="raise:1:prepare", timeout=180)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if "pyevo.search: error" in line]
    assert errors == ["pyevo.search: error (rank 1): rank 1 cannot read its data"], out.stderr[-3000:]
    assert not re.search(r"\[rank\d\]: Traceback", out.stderr), out.stderr[-3000:]  # no worker's traceback
    assert not (root / "refused").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_batch_the_ranks_cannot_share_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys, rank):
    from pyevo.search.__main__ import main

    for name, value in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": 1}.items():
        monkeypatch.setenv(name, str(value))
    assert main(["--quiet", "--out", str(tmp_path / "run"), "--set=distill.batch_size=7"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    if rank == 0:  # rank 0 speaks for the job; the other ranks end alike, silently
        assert lines == ["pyevo.search: error: distill.batch_size 7 cannot be split over 2 ranks: the global batch "
                         "is shared out evenly (batch_size / world size per rank); make it a multiple of 2"]
    else:
        assert lines == []
    assert not (tmp_path / "run").exists()


def test_nsr_and_mse_shards_give_the_full_batch_gradient_and_waits_follow_heartbeats(tmp_path):
    """The NSR, a ratio of sums, is not a mean over samples: each rank's share over the global
    denominator gives the full batch's gradient under DDP, where the mean of per-rank NSRs does not.
    A rank waiting for another waits past the timeout while the other's heartbeat goes on, and ends
    with an error once it stops."""
    script = tmp_path / "grads.py"
    script.write_text(textwrap.dedent(f'''
        import json, torch, torch.distributed as dist
        from pyevo.distributed import Context

        def noise_to_signal(s, t):  # pyevo.teacher.noise_to_signal, for one output tensor
            return ((s - t) ** 2).sum() / (t ** 2).sum()

        def block_mse(s, t):  # pyevo.distill.block_mse, for one output tensor
            return ((s - t) ** 2).sum() / t.numel()

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        context = Context(world, rank, rank, True, 60.0, "cpu")
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(2, 3, 3, padding=1).double()
        x = torch.randn(8, 2, 5, 5, dtype=torch.float64)
        # Rows of very different scales: the two shards' NSRs differ.
        target = torch.randn(8, 3, 5, 5, dtype=torch.float64) * torch.linspace(0.1, 3, 8, dtype=torch.float64)[:, None, None, None]
        rows = slice(rank * 4, rank * 4 + 4)

        def grads(loss_of, model=conv):
            conv.zero_grad()
            loss_of(model).backward()
            return [p.grad.clone() for p in conv.parameters()]

        def error(got, want):
            return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want))

        def parts(model):
            out = model(x[rows])
            return [(((out - target[rows]) ** 2).sum(), (target[rows] ** 2).sum())]

        full_nsr = grads(lambda m: noise_to_signal(m(x), target))
        full_mse = grads(lambda m: block_mse(m(x), target))
        ddp = context.data_parallel(conv)  # retraining's way: DDP averages the ranks' gradients
        exact = grads(lambda m: context.nsr(parts(m))[0][0], ddp)
        naive = grads(lambda m: noise_to_signal(m(x[rows]), target[rows]), ddp)
        with torch.no_grad():
            value = context.nsr(parts(conv))[1][0]
        grads(lambda m: block_mse(m(x[rows]), target[rows]))  # distillation's way: averaged once per step
        context.average_gradients(conv.parameters())
        mse = [p.grad.clone() for p in conv.parameters()]

        # Waiting for a rank: past the timeout while its heartbeat goes on, not once it stops.
        import sys, threading, time
        from pyevo.distributed import DistributedError, _beat

        context.timeout_s = 2.0
        stop = threading.Event()
        threading.Thread(target=_beat, args=(stop, rank, 0.1), daemon=True).start()
        if rank == 1:
            time.sleep(4)  # slow, alive: longer than the timeout
        context.wait_for_all()
        if rank == 1:  # silent from now on, and never at the next meeting point: gone
            stop.set()
            dist.destroy_process_group()
            sys.exit(0)
        start = time.monotonic()
        try:
            context.wait_for_all()
            silent = "no error"
        except DistributedError as failure:
            silent = str(failure)
        with open({str(tmp_path / "out.json")!r}, "w") as file:
            json.dump({{"exact": error(exact, full_nsr), "naive": error(naive, full_nsr), "mse": error(mse, full_mse),
                       "value": abs(value - float(noise_to_signal(conv(x).detach(), target))), "silent": silent,
                       "silent_s": time.monotonic() - start}}, file)
        # Rank 1 is gone: tearing down a gloo group whose peer has left can abort in C++ ("terminate
        # called without an active exception", seen once in CI). The figures are written; leave at once.
        import os
        os._exit(0)
    '''))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], capture_output=True, text=True, env=ENV, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    errors = json.loads((tmp_path / "out.json").read_text())
    assert errors["exact"] < 1e-12 and errors["value"] < 1e-12 and errors["mse"] < 1e-12
    assert errors["naive"] > 1e-2  # averaging per-rank NSRs is measurably not the full batch's gradient
    assert errors["silent"].startswith("rank 1 has not answered for 2 s") and errors["silent_s"] < 4.5


def test_blocks_go_largest_first_to_the_least_loaded_rank():
    assert assign_blocks({"a": 1, "b": 5, "c": 3, "d": 3}, 2) == {"a": 0, "b": 0, "c": 1, "d": 1}
    assert assign_blocks({"a": 2, "b": 2}, 3) == {"a": 0, "b": 1}
    assert set(assign_blocks({"a": 1, "b": 2}, 1).values()) == {0}


def test_shards_of_a_batch_are_the_one_process_batch():
    from pyevo.diffusion import ImageSet, noisy_batch

    data = ImageSet(torch.randn(20, 1, 4, 4), torch.arange(20))
    scheduler = DDPMScheduler(num_train_timesteps=100)
    whole = noisy_batch(data, scheduler, 6, torch.Generator().manual_seed(3))
    parts = [noisy_batch(data, scheduler, 6, torch.Generator().manual_seed(3), shard=(rank, 3)) for rank in range(3)]
    for field in ("noisy", "timesteps", "noise", "target", "labels"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field)), field
    assert SINGLE.shard is None and not SINGLE.active and SINGLE.is_main
