"""How well the per-block latency estimate predicts a student's measured latency.

The estimate a search uses is the teacher's stem (its whole forward minus its searched blocks, each
timed alone on recorded inputs) plus the student's blocks timed alone. This script builds a student
from a genome with weights from a fresh supernet (latency does not depend on the weights), then,
for several rounds, times teacher and student whole and block by block in turn
(``pyevo.evaluate.network_latency``) and prints the estimate's error in each round.

    python experiments/latency_estimate.py --genome "$(jq -r .student.genome runs/default/report.json)"
    python experiments/latency_estimate.py --rounds 5 --repeats 21 --device cuda --dtype float16
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

from pyevo.config import RunConfig
from pyevo.evaluate import network_latency
from pyevo.latency import DTYPES, device_name
from pyevo.pipeline import timing_call
from pyevo.space import decode_network, unet_space
from pyevo.student import StudentUNet2DModel
from pyevo.supernet import build_supernet
from pyevo.teacher import load_teacher


def main() -> None:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genome", required=True, help="the student's network genome (report.json: student.genome)")
    parser.add_argument("--teacher", default=defaults.teacher)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=defaults.latency.network_repeats)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--dtype", default=defaults.dtype, choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=defaults.batch)
    args = parser.parse_args()

    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")
    latency = dataclasses.replace(defaults.latency, network_repeats=args.repeats)
    try:
        teacher, _ = load_teacher(args.teacher)
        spaces = unet_space(teacher)
        genomes = decode_network(args.genome, spaces)
    except ValueError as error:  # TeacherError, or a genome that does not fit this teacher
        parser.exit(2, f"latency_estimate: error: {error}\n")
    student = StudentUNet2DModel.from_supernet(teacher, build_supernet(teacher), genomes)
    calls = {name: call.to(args.device, DTYPES[args.dtype])
             for name, call in timing_call(teacher, args.batch, defaults.seed).items()}

    print(f"{device_name(args.device)}, {args.dtype}, batch {args.batch}, median of {args.repeats} per call")
    print("| round | teacher (ms) | teacher blocks | teacher stem | student (ms) | student blocks | estimate | error |")
    print("|---|---|---|---|---|---|---|---|")
    errors = []
    for index in range(args.rounds):
        timed = network_latency({"teacher": teacher, "student": student}, calls, args.batch, args.dtype,
                                args.device, latency)
        t, s = timed["teacher"], timed["student"]
        estimate = t["stem_ms"] + sum(s["blocks_ms"].values())
        errors.append(estimate / s["latency_ms"] - 1)
        print(f"| {index} | {t['latency_ms']:.2f} | {sum(t['blocks_ms'].values()):.2f} | {t['stem_ms']:.2f} | "
              f"{s['latency_ms']:.2f} | {sum(s['blocks_ms'].values()):.2f} | {estimate:.2f} | "
              f"{100 * errors[-1]:+.1f}% |", flush=True)
    print(f"error: median {100 * statistics.median(errors):+.1f}%, "
          f"range {100 * min(errors):+.1f}% to {100 * max(errors):+.1f}%")


if __name__ == "__main__":
    main()
