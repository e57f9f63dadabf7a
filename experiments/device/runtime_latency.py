"""Teacher vs student latency under each runtime, timed in turn: issue 15's student targets.

The DDPM-CIFAR10 teacher config (``experiments/ddpm_cifar10/make_teacher.py``, random weights: latency
only) and a student of it at <= 50% of its MACs (the narrowest widths, then every second resnet skipped
until the MACs are under half), each run

* eager (the modules as they are), eager replayed as one CUDA graph (on CUDA), and
* lean: ``pyevo.optimize`` (fused GroupNorm+SiLU and a CUDA graph per input signature on CUDA; the
  modules as they are on the CPU), called as a pipeline calls its unet (input copies included).

Prints a table and writes ``--json``. Targets (issue 15, batch 64 float16 on an H100/H200): student
under lean >= 2x the teacher under lean, and >= 3x the teacher eager.

    python experiments/device/runtime_latency.py --device cuda --dtype float16 --batch 64 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ddpm_cifar10"))

from diffusers import UNet2DModel  # noqa: E402
from make_teacher import UNET_CONFIG  # noqa: E402

import pyevo  # noqa: E402,F401
from pyevo.cost import count_macs  # noqa: E402
from pyevo.latency import DTYPES, device_name, time_calls  # noqa: E402
from pyevo.runtime import cast_copy, optimize  # noqa: E402
from pyevo.space import encode_network  # noqa: E402
from pyevo.student import StudentUNet2DModel  # noqa: E402
from pyevo.supernet import build_supernet  # noqa: E402


def half_macs_student(teacher: UNet2DModel) -> tuple[StudentUNet2DModel, float]:
    """A student at <= 50% of the teacher's MACs: narrowest widths everywhere, then resnets skipped
    (every second one of each block, block by block) until it is under half."""
    supernet = build_supernet(teacher).eval()
    spaces = list(supernet.spaces.values())
    genomes = {space.name: list(space.narrow_genome()) for space in spaces}
    size = teacher.config.sample_size
    probe = (torch.randn(1, teacher.config.in_channels, size, size), torch.tensor([500]))
    teacher_macs = count_macs(teacher, *probe)
    skips = [(space.name, n) for space in spaces for n in range(1, len(space.resnets), 2)]
    while True:
        network = {name: space.canonical(genomes[name]) for name, space in zip(genomes, spaces)}
        student = StudentUNet2DModel.from_supernet(teacher, supernet, encode_network(network, spaces)).eval()
        ratio = count_macs(student, *probe) / teacher_macs
        if ratio <= 0.5 or not skips:
            return student, ratio
        name, n = skips.pop(0)
        genomes[name][3 * n + 2] = 0  # skip that resnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads while timing")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    teacher = UNet2DModel(**UNET_CONFIG).eval().requires_grad_(False)
    student, macs_ratio = half_macs_student(teacher)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    size = teacher.config.sample_size
    sample = torch.randn(args.batch, teacher.config.in_channels, size, size, device=device, dtype=dtype)
    timesteps = torch.full((args.batch,), 500, device=device, dtype=torch.long)
    models = {"teacher": cast_copy(teacher, device, dtype), "student": cast_copy(student, device, dtype)}
    fns, graphs = {}, set()
    for name, model in models.items():
        fns[(name, "eager")] = lambda model=model: model(sample, timesteps)
        if device.type == "cuda":
            fns[(name, "eager+graph")] = fns[(name, "eager")]
            graphs.add((name, "eager+graph"))
        lean = optimize(model)
        fns[(name, "lean")] = lambda lean=lean: lean(sample, timesteps)
    times = time_calls(fns, device, warmup=3, repeats=args.repeats, threads=args.threads, cuda_graph=graphs)
    runtimes = sorted({runtime for _, runtime in fns}, key=["eager", "eager+graph", "lean"].index)
    rows = {runtime: {"teacher_ms": times[("teacher", runtime)], "student_ms": times[("student", runtime)]}
            for runtime in runtimes}
    targets = {"student lean vs teacher lean (>= 2x)": rows["lean"]["teacher_ms"] / rows["lean"]["student_ms"],
               "student lean vs teacher eager (>= 3x)": rows["eager"]["teacher_ms"] / rows["lean"]["student_ms"]}
    result = {"device": device_name(device), "dtype": args.dtype, "batch": args.batch, "macs_ratio": macs_ratio,
              "genome": student.config.genome, "runtimes": rows, "targets": targets,
              "torch": torch.__version__}
    print(f"DDPM-CIFAR10 config, random weights, batch {args.batch} {args.dtype} on {result['device']}; "
          f"student at {macs_ratio:.3f} of the teacher's MACs")
    print("| runtime | teacher (ms) | student (ms) | teacher / student |")
    print("|---|---|---|---|")
    for runtime, row in rows.items():
        print(f"| {runtime} | {row['teacher_ms']:.3f} | {row['student_ms']:.3f} | "
              f"{row['teacher_ms'] / row['student_ms']:.2f}x |")
    for label, value in targets.items():
        print(f"{label}: {value:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
