"""Latency measurement and the persisted table."""
import json
import os
import platform
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pyevo.latency import LatencyTable, fingerprint, time_call, time_calls, timing_setup

SETUP = timing_setup("cpu", threads=2, runtime="lean", cuda_graph=False)


def test_time_call_measures_the_work():
    x = torch.randn(256, 256)
    small = time_call(lambda: x @ x, "cpu", warmup=1, repeats=5, threads=1)
    big_x = torch.randn(1024, 1024)
    big = time_call(lambda: big_x @ big_x, "cpu", warmup=1, repeats=5, threads=1)
    assert 0 < small < big  # 64x the FLOPs cannot take less time


def test_time_calls_times_each_call_in_turn():
    order = []
    times = time_calls({name: (lambda name=name: order.append(name)) for name in "abc"}, "cpu",
                       warmup=1, repeats=3, threads=1)
    assert order == list("abc") * 4  # one warm-up round, then every repeat runs each call once
    assert set(times) == set("abc") and all(ms >= 0 for ms in times.values())


def test_table_keys_persist_and_merge(tmp_path):
    path = tmp_path / "table.json"
    table = LatencyTable(path, "cpu", "float32", 64, "abc", setup=SETUP)
    calls = []
    assert table.lookup("mid_block", "r0:skip", lambda: calls.append(1) or 1.5) == 1.5
    assert table.lookup("mid_block", "r0:skip", lambda: calls.append(1) or 9.9) == 1.5
    assert calls == [1]
    table.save()
    other = LatencyTable(path, "cpu", "float32", 64, "abc", setup=SETUP)
    other.put("up_blocks.0", "a0:drop", 2.0)
    table.put("down_blocks.0", "r0:skip", 3.0)
    other.save()
    table.save()  # merges with what `other` wrote
    entries = json.loads(path.read_text())
    assert {k.split("|", 7)[-1] for k in entries} == {"mid_block|r0:skip", "up_blocks.0|a0:drop",
                                                       "down_blocks.0|r0:skip"}
    # A different batch, dtype or teacher is a different key.
    assert LatencyTable(path, "cpu", "float32", 32, "abc", setup=SETUP).get("mid_block", "r0:skip") is None
    assert LatencyTable(path, "cpu", "float16", 64, "abc", setup=SETUP).get("mid_block", "r0:skip") is None
    assert LatencyTable(path, "cpu", "float32", 64, "xyz", setup=SETUP).get("mid_block", "r0:skip") is None
    # And so is another way of running the blocks (here: another thread count).
    one_thread = timing_setup("cpu", threads=1, runtime="lean", cuda_graph=False)
    assert LatencyTable(path, "cpu", "float32", 64, "abc", setup=one_thread).get("mid_block", "r0:skip") is None


def test_timing_setup_names_what_changes_a_timing(monkeypatch, tmp_path):
    # CPU: the thread count; both runtimes run the modules as they are there, so they share figures
    # and a CUDA-graph flag changes nothing.
    cpu = {timing_setup("cpu", t, r, g) for t in (2,) for r in ("eager", "lean") for g in (False, True)}
    assert cpu == {"modules,threads2"} and timing_setup("cpu", 1, "lean", False) != timing_setup("cpu", 2, "lean", False)
    # CUDA: the runtime, whether graphs are replayed (always under lean) and the ops' kernel choices
    # on the GPU: a digest of the measured table's entries for it, so a changed table re-times.
    from pyevo import ops
    from pyevo.kernel_choices import load_kernel_choices, write_kernel_choices

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = {(r, g): timing_setup("cuda", 2, r, g) for r in ("eager", "lean") for g in (False, True)}
    assert len({cuda[("eager", False)], cuda[("eager", True)], cuda[("lean", False)]}) == 3
    assert cuda[("lean", False)] == cuda[("lean", True)] and "graph1" in cuda[("lean", False)]
    assert cuda[("lean", False)].endswith(",kernels-aten")  # the shipped table does not name this GPU
    setups = set()
    for kernel in ("pyevo", "aten"):
        entry = {"device": "Test GPU", "capability": "9.0", "op": "shared_attention", "dtype": "bfloat16",
                 "shape": {"B": 2, "S": 64, "C": 32, "heads": 2, "head_dim": 16, "cross": False, "S_kv": 64,
                           "C_kv": 32},
                 "kernel": kernel, "pyevo_ms": 1.0, "aten_ms": 1.0, "date": "2026-12-08", "torch": "2.14.1"}
        write_kernel_choices(tmp_path / f"{kernel}.json", [entry])
        monkeypatch.setattr(ops, "KERNEL_CHOICES", load_kernel_choices(tmp_path / f"{kernel}.json"))
        setups.add(timing_setup("cuda", 2, "lean", False))
    assert len(setups | {cuda[("lean", False)]}) == 3


def test_two_processes_saving_one_cache_at_once_both_keep_their_entries(tmp_path):
    """Read-merge-write under flock: two real processes put disjoint entries and save after each one, at
    the same time, into one cache; every entry of both survives, and the files get the user's usual mode."""
    path = tmp_path / "shared" / "latency.json"
    go = tmp_path / "go"
    script = textwrap.dedent("""
        import os, sys, time
        from pyevo.latency import LatencyTable
        path, go, name = sys.argv[1:4]
        table = LatencyTable(path, "cpu", "float32", 2, "teacher", setup="modules,threads2")
        open(go + "." + name, "w").close()  # ready
        while not os.path.exists(go):  # start together
            time.sleep(0.01)
        for i in range(40):
            table.put(name, f"g{i}", float(i + 1))
            table.save()
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    old_mask = os.umask(0o027)  # the children inherit it: files must come out 0640, not the 0600 of mkstemp
    try:
        procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(go), name], env=env)
                 for name in ("down_blocks.0", "up_blocks.1")]
    finally:
        os.umask(old_mask)
    # Both have imported torch and opened the table (an empty one) before either saves.
    import time
    while not all(Path(f"{go}.{name}").exists() for name in ("down_blocks.0", "up_blocks.1")):
        assert all(p.poll() is None for p in procs)
        time.sleep(0.05)
    go.write_text("")
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    table = LatencyTable(path, "cpu", "float32", 2, "teacher", setup=SETUP)
    for name in ("down_blocks.0", "up_blocks.1"):
        assert [table.get(name, f"g{i}") for i in range(40)] == [float(i + 1) for i in range(40)]
    assert len(json.loads(path.read_text())) == 80
    assert {p.name for p in path.parent.iterdir()} == {"latency.json", "latency.json.lock"}  # no temporaries
    for file in path.parent.iterdir():
        assert file.stat().st_mode & 0o777 == 0o640, file


def test_saving_keeps_what_another_run_stored_for_a_key_this_one_only_read(tmp_path):
    path = tmp_path / "latency.json"
    first = LatencyTable(path, "cpu", "float32", 2, "t", setup=SETUP)
    first.put("mid_block", "a", 1.0)
    first.save()
    mine = LatencyTable(path, "cpu", "float32", 2, "t", setup=SETUP)
    theirs = LatencyTable(path, "cpu", "float32", 2, "t", setup=SETUP)
    theirs.put("mid_block", "a", 2.0)  # re-timed elsewhere
    theirs.save()
    mine.put("mid_block", "b", 3.0)
    mine.save()
    assert LatencyTable(path, "cpu", "float32", 2, "t", setup=SETUP).get("mid_block", "a") == 2.0
    assert mine.get("mid_block", "a") == 2.0 and mine.get("mid_block", "b") == 3.0  # merged back into the table


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "must hold a JSON object (a pyevo latency table), not a list"),
    ('{"a": ', "is not valid JSON"),
    ('{"a": "fast"}', "entry 'a' is 'fast', not a finite number"),
    ('{"a": NaN}', "entry 'a' is nan, not a finite number"),
])
def test_a_cache_that_is_not_a_table_is_refused_and_left_as_it_is(tmp_path, content, message):
    from pyevo.latency import LatencyCacheError

    path = tmp_path / "latency.json"
    path.write_text(content)
    with pytest.raises(LatencyCacheError, match=re.escape(message)):
        LatencyTable(path, "cpu", "float32", 2, "t", setup=SETUP)
    assert path.read_text() == content and os.listdir(tmp_path) == ["latency.json"]


def test_fingerprint_ignores_private_keys_only():
    assert fingerprint({"a": 1, "_name": "x"}) == fingerprint({"a": 1, "_name": "y"})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_network_latency_times_each_network_whole_and_by_its_own_blocks():
    from diffusers import UNet2DModel

    from pyevo.config import LatencyConfig
    from pyevo.evaluate import network_latency
    from pyevo.teacher import record_blocks

    torch.manual_seed(0)
    kwargs = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, norm_num_groups=4,
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    networks = {"teacher": UNet2DModel(block_out_channels=(8, 16), **kwargs),
                "student": UNet2DModel(block_out_channels=(8, 16), **kwargs)}
    calls = record_blocks(networks["teacher"], torch.randn(2, 1, 8, 8), torch.full((2,), 10))[0]
    calls = {name: call.to("cpu", torch.bfloat16) for name, call in calls.items()}
    counts = {}
    for network, unet in networks.items():
        for name in calls:
            unet.get_submodule(name).register_forward_hook(
                lambda *_, key=(network, name): counts.__setitem__(key, counts.get(key, 0) + 1))
    timed = network_latency(networks, calls, batch=2, dtype="bfloat16", device="cpu",
                            config=LatencyConfig(warmup=1, network_repeats=2, threads=1))
    # Each block ran (1 + 2) times alone on its recorded inputs and as often inside its network under
    # each runtime (the run's, lean, and eager beside it).
    assert counts == {(network, name): 9 for network in networks for name in calls}
    for network, result in timed.items():
        assert set(result["blocks_ms"]) == set(calls)
        assert result["runtime"] == "lean" and set(result["runtimes_ms"]) == {"eager", "lean"}
        assert result["runtimes_ms"]["lean"] == result["latency_ms"] and result["runtimes_ms"]["eager"] > 0
        # The stem is measured (blocks replayed, their hooks not called), and the remainder is reported.
        assert 0 < result["stem_ms"] < result["latency_ms"]
        assert result["unaccounted_ms"] == pytest.approx(
            result["latency_ms"] - result["stem_ms"] - sum(result["blocks_ms"].values()))
        # The blocks are the network's own again afterwards.
        assert all(not type(networks[network].get_submodule(name)).__name__.startswith("_") for name in calls)
        # Timed in the deployment dtype, returned in float32.
        assert {p.dtype for p in networks[network].parameters()} == {torch.float32}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_cpu_timing_keeps_freed_memory_so_calls_do_not_page_fault():
    # 16 x 4 MiB written and freed, four times; page faults counted in the last round, in a fresh
    # process. glibc starts out mapping every buffer over 128 KiB afresh and moves that threshold
    # with what it has seen, so the control fixes it there; CPU timing must override it.
    script = textwrap.dedent("""
        import resource, sys, torch
        from pyevo.latency import time_call
        if sys.argv[1] == "timed":
            time_call(lambda: None, "cpu", warmup=0, repeats=1, threads=1)
        def round_trip():
            buffers = [torch.ones(1024 * 1024) for _ in range(16)]
            del buffers
        for _ in range(3):
            round_trip()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        round_trip()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], check=True, capture_output=True,
                                       text=True, env=env).stdout.split()[-1]) for mode in ("default", "timed")}
    assert faults["default"] >= 16 * 1024  # every buffer unmapped when freed, faulted in page by page
    assert faults["timed"] <= 16
