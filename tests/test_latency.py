"""Latency measurement and the persisted table."""
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from pyevo.latency import LatencyTable, fingerprint, time_call, time_calls


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
    table = LatencyTable(path, "cpu", "float32", 64, "abc")
    calls = []
    assert table.lookup("mid_block", "r0:skip", lambda: calls.append(1) or 1.5) == 1.5
    assert table.lookup("mid_block", "r0:skip", lambda: calls.append(1) or 9.9) == 1.5
    assert calls == [1]
    table.save()
    other = LatencyTable(path, "cpu", "float32", 64, "abc")
    other.put("up_blocks.0", "a0:drop", 2.0)
    table.put("down_blocks.0", "r0:skip", 3.0)
    other.save()
    table.save()  # merges with what `other` wrote
    entries = json.loads(path.read_text())
    assert {k.split("|", 6)[-1] for k in entries} == {"mid_block|r0:skip", "up_blocks.0|a0:drop",
                                                       "down_blocks.0|r0:skip"}
    # A different batch, dtype or teacher is a different key.
    assert LatencyTable(path, "cpu", "float32", 32, "abc").get("mid_block", "r0:skip") is None
    assert LatencyTable(path, "cpu", "float16", 64, "abc").get("mid_block", "r0:skip") is None
    assert LatencyTable(path, "cpu", "float32", 64, "xyz").get("mid_block", "r0:skip") is None


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
    # Each block ran (1 + 2) times alone on its recorded inputs and as often inside its network.
    assert counts == {(network, name): 6 for network in networks for name in calls}
    for network, result in timed.items():
        assert set(result["blocks_ms"]) == set(calls)
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
