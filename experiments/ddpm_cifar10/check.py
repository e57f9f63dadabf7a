"""Checks on a finished DDPM-CIFAR10 run, and its table (generated from the run's report.json).

(a) the supernet built from the teacher: its teacher-shaped path reproduces every teacher block
    on the block inputs recorded from one teacher forward (max abs difference), in float32 and
    in float64 (where only rounding can separate the two);
(b) the exported student reloads with ``pyevo.StudentUNet2DModel.from_pretrained`` in a fresh
    Python process and runs one forward whose output has the teacher's shape;
(c) the table: teacher vs student MACs, params, measured latency, the per-block latency estimate
    and its error, with the machine and the date. The teacher has random weights, so every row
    is an architecture figure; quality numbers are not reported.

The checks and the table live in ``experiments/arch_checks.py``, shared with ``ldm_celebahq/``.

    python experiments/ddpm_cifar10/check.py --teacher runs/ddpm_cifar10/teacher --run runs/ddpm_cifar10/run
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: the shared arch_checks

from arch_checks import check_reload, load_after, print_teacher_path, table, teacher_output_shape  # noqa: E402


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

    failed = print_teacher_path(args.teacher)

    print("(b) student reloaded in a fresh process")
    teacher_shape = [2, *teacher_output_shape(args.teacher)]
    reload = check_reload(run / "student")
    print(f"  {reload['class']}: output {reload['shape']} (teacher {teacher_shape}), finite {reload['finite']}, "
          f"{reload['params']:,} params (report: {report['student']['params']:,})")
    if reload["shape"] != teacher_shape or not reload["finite"] or reload["params"] != report["student"]["params"]:
        failed.append(("reload", reload))

    print("(c) table")
    text = table(report, config, {"before": args.load_before, "after": load_after()}, "DDPM-CIFAR10")
    (run / "table.md").write_text(text + "\n")
    print(text)
    if failed:
        raise SystemExit(f"checks failed: {failed}")


if __name__ == "__main__":
    main()
