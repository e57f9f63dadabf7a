"""What ``search.cap_latency_slack`` buys: the study's pyevo ``diffnas`` arms re-selected at another slack, and
their students timed beside the ones the study ran, and the teacher (`experiments/cap_latency_slack.md`).

    python experiments/cap_latency_slack.py --teacher digits --study runs/study --out runs/slack-probe \
        --targets 70 50 40 30 --slack 1.0

``--study`` is a study's work folder (``python -m pyevo.study --out``) that still holds the arms'
``pyevo-diffnas-<target>`` folders. Only the selection runs again (in a copy, under ``--out``): the search
and the distilled supernet are the arm's own. The students are timed as the study's latency units time
them (the whole forward at batch 64, float32, CPU, in turn with the teacher); their weights do not matter
for that, so they are not retrained.
"""

from __future__ import annotations

import argparse
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch

from pyevo import pipeline
from pyevo.config import load_config
from pyevo.evaluate import deployed
from pyevo.latency import time_calls
from pyevo.runfolder import read_json
from pyevo.space import decode_network, unet_space
from pyevo.student import student_class
from pyevo.study.units import BASE_FILES
from pyevo.supernet import build_supernet
from pyevo.teacher import load_teacher


def reselect(arm: Path, out: Path, slack: float) -> Path:
    """A copy of the arm's run with its selection made again at ``slack``."""
    copy = out / arm.name
    if copy.exists():
        shutil.rmtree(copy)
    copy.mkdir(parents=True)
    for name in BASE_FILES:  # what an arm copies from its base is what selecting again reads
        if (arm / name).is_file():
            shutil.copy2(arm / name, copy / name)
    config = load_config(copy / "config.yaml", {"search.cap_latency_slack": slack, "out": str(copy)})
    pipeline.run(config, resume=True, progress=False, until="select")
    return copy


def summary(run: Path) -> dict:
    """The selection's MACs, params and latency estimate (ratios to the teacher), and its summed NSR relative to
    each block's teacher-shaped NSR (what the caps' repair minimises)."""
    selected = read_json(run / "select.json")
    teacher_nsr = {name: block["teacher"]["nsr"] for name, block in read_json(run / "search.json")["blocks"].items()}
    return {"genome": selected["genome"], "macs": selected["macs_ratio"], "params": selected["params_ratio"],
            "estimate": selected["latency_estimate_ms"] / selected["teacher_ms"],
            "relative_nsr": sum(block["nsr"] / teacher_nsr[name] for name, block in selected["blocks"].items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--targets", nargs="+", default=["70", "50", "40", "30"])
    parser.add_argument("--slack", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    teacher, _ = load_teacher(args.teacher)
    teacher.eval()
    supernet, space = build_supernet(teacher), unet_space(teacher)
    rows, models = [], {"teacher": teacher}
    for target in args.targets:
        arm = args.study / f"pyevo-diffnas-{target}"
        if not (arm / "search.json").is_file():
            print(f"{arm}: no search.json (the study's work folder lost it): skipped")
            continue
        configured = load_config(arm / "config.yaml").search.cap_latency_slack
        if configured == args.slack:
            raise SystemExit(f"{arm} ran at slack {configured:g} already: give --slack another value")
        ran, again = summary(arm), summary(reselect(arm, args.out, args.slack))
        for slack, selection in ((configured, ran), (args.slack, again)):
            name = f"{target}% slack {slack:g}"
            genomes = decode_network(selection["genome"], space)
            models[name] = student_class(teacher).from_supernet(teacher, supernet, genomes).eval()
            rows.append((name, selection))

    measured: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):  # every round times every model in turn, one machine state for all
        with ExitStack() as stack:
            fns = {name: stack.enter_context(deployed(net, 64, "float32", "cpu"))[0] for name, net in models.items()}
            times = time_calls(fns, "cpu", warmup=3, repeats=21, threads=torch.get_num_threads())
        for name in models:
            measured[name].append(times[name] / times["teacher"])

    print(f"| {args.teacher} arm | MACs | params | summed relative NSR | estimated latency | measured latency |")
    print("|---|---|---|---|---|---|")
    for name, selection in rows:
        rounds = " / ".join(f"{ratio:.3f}" for ratio in measured[name])
        print(f"| {name} | {selection['macs']:.3f} | {selection['params']:.3f} | {selection['relative_nsr']:.2f} | "
              f"{selection['estimate']:.3f} | {rounds} |")


if __name__ == "__main__":
    main()
