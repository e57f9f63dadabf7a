"""Checks on a finished DDPM-CIFAR10 run, and its table (generated from the run's report.json).

(a) the supernet built from the teacher: its teacher-shaped path reproduces every teacher block
    on the block inputs recorded from one teacher forward (max abs difference), in float32 and
    in float64 (where only rounding can separate the two);
(b) the exported student reloads with ``pyevo.StudentUNet2DModel.from_pretrained`` in a fresh
    Python process and runs one forward whose output has the teacher's shape;
(c) the table: teacher vs student MACs, params, measured latency, the per-block latency estimate
    and its error, with the machine and the date. The teacher has random weights, so every row
    is an architecture figure; quality numbers are not reported.

    python experiments/ddpm_cifar10/check.py --teacher runs/ddpm_cifar10/teacher --run runs/ddpm_cifar10/run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import pyevo  # noqa: F401  (registers torch.ops.pyevo.*, which the supernet's layers call)
from pyevo.supernet import build_supernet
from pyevo.teacher import load_teacher, output_tensors, record_blocks

# float32 tolerance relative to the block output's scale: the supernet computes a 3x3 conv as the
# centre of a zero-ringed 5x5 through pyevo's op, so sums run in another order than the teacher's.
REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def check_teacher_path(teacher_folder: str, dtype: torch.dtype, batch: int = 2, seed: int = 0) -> list[dict]:
    teacher, _ = load_teacher(teacher_folder)
    # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast (an empty keep-in-float32 list).
    teacher = torch.nn.Module.to(teacher, dtype).eval()
    supernet = build_supernet(teacher).eval()
    generator = torch.Generator().manual_seed(seed)
    size = teacher.config.sample_size
    sample = torch.randn(batch, teacher.config.in_channels, size, size, generator=generator).to(dtype)
    # Two different timesteps, so the time embedding path is exercised with distinct rows.
    calls, _ = record_blocks(teacher, sample, torch.tensor([7, 650][:batch]))
    rows = []
    with torch.no_grad():
        for name, block in supernet.items():
            block.set_genome(block.space.teacher_genome())
            call = calls[name]
            got, want = output_tensors(block(*call.args, **call.kwargs)), output_tensors(call.output)
            assert len(got) == len(want), f"{name}: {len(got)} outputs, teacher {len(want)}"
            diff = max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
            scale = max(w.abs().max().item() for w in want)
            assert all(g.shape == w.shape for g, w in zip(got, want)), f"{name}: output shapes differ"
            rows.append({"block": name, "max_abs_diff": diff, "scale": scale, "ok": diff <= REL_TOL[dtype] * scale})
    return rows


# Run in a separate interpreter: nothing of this process (imported classes, registered ops,
# a supernet in memory) can make the reload pass that a user's fresh session would fail.
RELOAD = r"""
import json, sys, torch, pyevo
student = pyevo.StudentUNet2DModel.from_pretrained(sys.argv[1]).eval()
size = student.config.sample_size
x = torch.randn(2, student.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = student(x, torch.tensor([10, 900])).sample
print(json.dumps({"class": type(student).__name__, "shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
                  "params": sum(p.numel() for p in student.parameters())}))
"""


def check_reload(student_folder: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", RELOAD, str(student_folder)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"student reload failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(report: dict, threads: int) -> str:
    return (f"{report['device_name']} ({os.cpu_count()} logical CPUs, {threads} timing threads), "
            f"torch {report['torch']}, {report['dtype']}, batch {report['batch']}, {platform.python_implementation()} "
            f"{platform.python_version()}")


def table(report: dict, config: dict, load: dict) -> str:
    t, s, r, sel = report["teacher"], report["student"], report["ratios"], report["selection"]
    today = datetime.date.today().isoformat()
    lines = [
        f"Random-weight teacher (DDPM-CIFAR10 shapes): architecture figures only, no quality. {today}.",
        f"Machine: {machine(report, config['latency']['threads'])}.",
        f"Load average (1/5/15 min) before the run: {load.get('before', '?')}; after: {load.get('after', '?')}.",
        "",
        "| random weights | teacher | student | student / teacher |",
        "|---|---|---|---|",
        f"| MACs (batch 1) | {t['macs']:,} | {s['macs']:,} | {r['macs']:.3f} |",
        f"| params | {t['params']:,} | {s['params']:,} | {r['params']:.3f} |",
        f"| latency, measured (ms, batch {report['batch']}) | {t['latency_ms']:.1f} | {s['latency_ms']:.1f} | "
        f"{r['latency']:.3f} |",
        f"| latency, per-block estimate (ms) | — | {s['latency_estimate_ms']:.1f} | "
        f"error {100 * s['latency_estimate_error']:+.1f}% vs measured |",
        f"| latency at selection, per-block estimate (ms) | {sel['teacher_ms']:.1f} | {sel['student_estimate_ms']:.1f}"
        f" | {sel['latency_ratio_estimate']:.3f} (error {100 * sel['latency_ratio_error']:+.1f}% vs measured ratio) |",
        f"| latency budget (rule {report['rule']}), fraction of the teacher | | | {config['search']['budget']:g} |",
        "",
        "| block (random weights) | teacher ms | student ms | student pick |",
        "|---|---|---|---|",
    ]
    for name, ms in t["blocks_ms"].items():
        lines.append(f"| {name} | {ms:.1f} | {s['blocks_ms'][name]:.1f} | `{report['blocks'][name]['pick']['genome']}` |")
    lines.append(f"| stem (whole minus blocks) | {t['stem_ms']:.1f} | {s['stem_ms']:.1f} | |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {value['seconds']:.1f} |" for name, value in report["stages"].items()]
    lines.append(f"| total | {sum(v['seconds'] for v in report['stages'].values()):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--run", required=True, help="the pyevo run folder (report.json, student/)")
    parser.add_argument("--load-before", default=None, help="`uptime` load average before the run")
    args = parser.parse_args()
    run = Path(args.run)
    report = json.loads((run / "report.json").read_text())
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())

    print("(a) teacher-shaped supernet path vs teacher, per block (max abs difference / output scale)")
    failed = []
    for dtype in (torch.float32, torch.float64):
        for row in check_teacher_path(args.teacher, dtype):
            print(f"  {str(dtype):14s} {row['block']:14s} {row['max_abs_diff']:.3e} / {row['scale']:.3e}"
                  f"  {'ok' if row['ok'] else 'FAIL'}")
            if not row["ok"]:
                failed.append((dtype, row["block"]))

    print("(b) student reloaded in a fresh process")
    teacher_shape = [2, *teacher_output_shape(args.teacher)]
    reload = check_reload(run / "student")
    print(f"  {reload['class']}: output {reload['shape']} (teacher {teacher_shape}), finite {reload['finite']}, "
          f"{reload['params']:,} params (report: {report['student']['params']:,})")
    if reload["shape"] != teacher_shape or not reload["finite"] or reload["params"] != report["student"]["params"]:
        failed.append(("reload", reload))

    print("(c) table")
    with open("/proc/loadavg") as f:
        after = " ".join(f.read().split()[:3])
    text = table(report, config, {"before": args.load_before, "after": after})
    (run / "table.md").write_text(text + "\n")
    print(text)
    if failed:
        raise SystemExit(f"checks failed: {failed}")


def teacher_output_shape(teacher_folder: str) -> list[int]:
    """(channels, height, width) of the teacher's output, from its config."""
    folder = Path(teacher_folder)
    config = json.loads((folder / "unet" / "config.json" if (folder / "unet").is_dir() else folder / "config.json")
                        .read_text())
    size = config["sample_size"]
    size = [size, size] if isinstance(size, int) else list(size)
    return [config["out_channels"], *size]


if __name__ == "__main__":
    main()
