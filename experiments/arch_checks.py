"""Checks shared by the architecture-level experiments (random-weight teachers with published
shapes: ``ddpm_cifar10/``, ``ldm_celebahq/``, ``sd15/``), and their table, generated from a run's report.json.

- :func:`check_teacher_path`: the supernet built from the teacher reproduces every teacher block
  on its teacher-shaped path, on the block inputs recorded from one teacher forward;
- :func:`check_reload`: a script run in a fresh Python process (by default: the exported student
  reloaded with ``pyevo.StudentUNet2DModel.from_pretrained`` and one forward), its JSON answer;
- :func:`table`: teacher vs student MACs, params, measured latency, the per-block latency estimate
  and its error, per block and per stage, with the machine, the date and the load; for a latent
  teacher also the decode time and the time of one batch of images (UNet steps + one decode).

An experiment's ``check.py`` imports this module with ``experiments/`` put on ``sys.path``.
"""
from __future__ import annotations

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


def check_teacher_path(teacher_folder: str, dtype: torch.dtype, batch: int = 2, seed: int = 0,
                       encoder_hidden_states: torch.Tensor | None = None) -> list[dict]:
    """Per block: the teacher-shaped super-block's output vs the teacher block's (max abs difference).
    A text-conditional teacher is called at ``encoder_hidden_states`` (its first ``batch`` rows)."""
    teacher, _ = load_teacher(teacher_folder)
    # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast (an empty keep-in-float32 list).
    teacher = torch.nn.Module.to(teacher, dtype).eval()
    supernet = build_supernet(teacher).eval()
    generator = torch.Generator().manual_seed(seed)
    size = teacher.config.sample_size
    sample = torch.randn(batch, teacher.config.in_channels, size, size, generator=generator).to(dtype)
    # Two different timesteps, so the time embedding path is exercised with distinct rows.
    states = None if encoder_hidden_states is None else encoder_hidden_states[:batch].to(dtype)
    calls, _ = record_blocks(teacher, sample, torch.tensor([7, 650][:batch]), encoder_hidden_states=states)
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


def print_teacher_path(teacher_folder: str, encoder_hidden_states: torch.Tensor | None = None,
                       dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> list:
    """Check (a) in float32 and float64, printed; the (dtype, block) pairs that failed."""
    print("(a) teacher-shaped supernet path vs teacher, per block (max abs difference / output scale)")
    failed = []
    for dtype in dtypes:
        for row in check_teacher_path(teacher_folder, dtype, encoder_hidden_states=encoder_hidden_states):
            print(f"  {str(dtype):14s} {row['block']:14s} {row['max_abs_diff']:.3e} / {row['scale']:.3e}"
                  f"  {'ok' if row['ok'] else 'FAIL'}")
            if not row["ok"]:
                failed.append((dtype, row["block"]))
    return failed


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


def check_reload(student_folder: Path, *more_args: str, script: str = RELOAD) -> dict:
    """Run ``script`` in a fresh interpreter with the student folder (and ``more_args``) as its
    arguments; its last line of output, parsed as JSON."""
    done = subprocess.run([sys.executable, "-c", script, str(student_folder), *more_args], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"student reload failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def teacher_output_shape(teacher_folder: str) -> list[int]:
    """(channels, height, width) of the teacher's output, from its config."""
    folder = Path(teacher_folder)
    config = json.loads((folder / "unet" / "config.json" if (folder / "unet").is_dir() else folder / "config.json")
                        .read_text())
    size = config["sample_size"]
    size = [size, size] if isinstance(size, int) else list(size)
    return [config["out_channels"], *size]


def machine(report: dict, threads: int) -> str:
    return (f"{report['device_name']} ({os.cpu_count()} logical CPUs, {threads} timing threads), "
            f"torch {report['torch']}, {report['dtype']}, batch {report['batch']}, {platform.python_implementation()} "
            f"{platform.python_version()}")


def load_after() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def table(report: dict, config: dict, load: dict, title: str) -> str:
    """The experiment's markdown table; ``title`` names the teacher's shapes (e.g. "DDPM-CIFAR10")."""
    t, s, r, sel = report["teacher"], report["student"], report["ratios"], report["selection"]
    today = datetime.date.today().isoformat()
    lines = [
        f"Random-weight teacher ({title} shapes): architecture figures only, no quality. {today}.",
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
    ]
    latent = report.get("latent")
    if latent is not None:
        lines += [
            f"| decode, once per batch ({latent['autoencoder']}, {'x'.join(map(str, latent['latent_shape']))} -> "
            f"{'x'.join(map(str, latent['image_shape']))}, ms, batch {report['batch']}) | {latent['decode_ms']:.1f} | "
            f"{latent['decode_ms']:.1f} | the teacher's |",
            f"| one batch of images: {latent['ddim_steps']} UNet steps + one decode (ms, batch {report['batch']}) | "
            f"{latent['teacher_batch_ms']:.1f} | {latent['student_batch_ms']:.1f} | {r['batch_of_images']:.3f} |",
        ]
    lines += [
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
