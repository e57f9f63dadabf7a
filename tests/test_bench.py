"""Smoke test of the kernel microbenchmarks: ``python -m pyevo.bench --quick`` on the CPU (tiny
shapes, a few seconds). It checks the table's content and that every op agrees with its
baseline (the run compares outputs), never a time."""
import json

import torch

from pyevo.bench import kernel_choice_entries
from pyevo.bench.__main__ import main
from pyevo.kernel_choices import load_kernel_choices, shape_key, write_kernel_choices


def test_bench_quick_cpu(tmp_path, capsys):
    out, choices = tmp_path / "bench.json", tmp_path / "kernel_choices.json"
    threads = torch.get_num_threads()
    assert main(["--quick", "--device", "cpu", "--json", str(out), "--threads", "1",
                 "--kernel-choices", str(choices)]) == 0
    # The process-wide settings the benchmark changes are as they were.
    assert torch.get_num_threads() == threads
    # On the CPU there is nothing to choose between: a valid table without entries.
    assert load_kernel_choices(choices).entries == ()
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
    for row in data["rows"]:  # what a table entry needs, on the ops with both implementations
        assert ("kernel_choice" in row) == (row["op"] in ("attention", "fused-conv conv1", "fused-conv conv2"))


def test_kernel_choice_entries_from_rows(tmp_path):
    """A GPU run's rows as table entries: ours against the best ATen baseline of the case (not the
    graph-captured one), pyevo's chosen only where it is 5% faster; rows where ours ran ATen's itself
    (the CUTLASS kernel did not apply) give none. The entries load back as a table."""
    conv_shape = {"N": 8, "C_in": 64, "C_out": 64, "H": 16, "W": 16, "kernel_size": 3, "has_temb": True,
                  "has_residual": False, "channels_last": True}
    attention_shape = {"B": 2, "S": 64, "C": 32, "heads": 2, "head_dim": 16, "cross": False, "S_kv": 64, "C_kv": 32}

    def row(op, dtype, shape, ours_ms, baselines, aten_baselines, **extra):
        return {"op": "attention" if op == "shared_attention" else "fused-conv conv1", "dtype": dtype,
                "ours_ms": ours_ms, "baselines": baselines,
                "kernel_choice": {"op": op, "shape": shape, "aten_baselines": aten_baselines}, **extra}

    rows = [
        row("fused_conv2d", "bfloat16", conv_shape, 0.10,
            {"eager": {"ms": 0.2}, "eager NHWC": {"ms": 0.12}, "graph": {"ms": 0.05}}, ["eager", "eager NHWC"],
            ours_kernel="cutlass_sm90"),
        row("fused_conv2d", "float16", conv_shape, 0.10, {"eager": {"ms": 0.2}, "eager NHWC": {"ms": 0.3}},
            ["eager", "eager NHWC"], ours_kernel="aten: dtype float16 (...)"),
        row("shared_attention", "bfloat16", attention_shape, 0.10,
            {"sdpa-flash": {"ms": 0.104}, "sdpa-cudnn": {"error": "No available kernel"}}, ["sdpa-flash", "sdpa-cudnn"]),
        {"op": "gn+silu", "dtype": "bfloat16", "ours_ms": 0.1, "baselines": {"eager": {"ms": 0.3}}},
    ]
    entries = kernel_choice_entries(rows, "Test GPU", "9.0", "2.14.1", "2026-12-08", "python -m pyevo.bench")
    assert [(e["op"], e["kernel"], e["aten_baseline"], e["aten_ms"]) for e in entries] == [
        ("fused_conv2d", "pyevo", "eager NHWC", 0.12), ("shared_attention", "aten", "sdpa-flash", 0.104)]
    path = tmp_path / "choices.json"
    write_kernel_choices(path, entries)
    table = load_kernel_choices(path)
    assert table.choices == {("Test GPU", "9.0", shape_key("fused_conv2d", "bfloat16", conv_shape)): "pyevo",
                             ("Test GPU", "9.0", shape_key("shared_attention", "bfloat16", attention_shape)): "aten"}
