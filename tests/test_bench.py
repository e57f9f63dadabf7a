"""Smoke test of the kernel microbenchmarks: ``python -m pyevo.bench --quick`` on the CPU (tiny
shapes, a few seconds). It checks the table's content and that every op agrees with its
baseline (the run compares outputs), never a time."""
import json

import torch

from pyevo.bench.__main__ import main


def test_bench_quick_cpu(tmp_path, capsys):
    from pyevo import ops

    out = tmp_path / "bench.json"
    threads, kernels = torch.get_num_threads(), ops.get_cuda_kernels()
    assert main(["--quick", "--device", "cpu", "--json", str(out), "--threads", "1"]) == 0
    # The process-wide settings the benchmark changes are as they were (it measures pyevo's own kernels).
    assert (torch.get_num_threads(), ops.get_cuda_kernels()) == (threads, kernels)
    data = json.loads(out.read_text())
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["quick"] is True
    assert data["peaks"]["matmul_tflops"]["float32"] > 0 and data["peaks"]["copy_gbps"] > 0
    ops = {row["op"] for row in data["rows"]}
    # No plain or population conv cases: those ops run cuDNN on CUDA, the baseline itself.
    assert ops == {"gn+silu", "attention", "pop-gn+silu", "pop-attention shared-input",
                   "fused-conv conv1", "fused-conv conv2"}
    for row in data["rows"]:
        assert row["ours_ms"] > 0
        timed = [b for b in row["baselines"].values() if "ms" in b]
        assert timed and all(b["ms"] > 0 and b["speedup"] > 0 for b in timed)
        assert row["max_rel_diff"] < 1e-4, row  # ours computes what the baseline computes
        assert 0 < row["fraction_of_peak"]
        assert ("tflops" in row) != ("gbps" in row)
        if row["op"].startswith("pop-"):
            assert row["candidates"] == 4
    printed = capsys.readouterr().out
    assert "peaks:" in printed and "pop-attention shared-input" in printed and str(out) in printed
