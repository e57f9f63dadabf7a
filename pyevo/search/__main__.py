"""``python -m pyevo.search``: the whole DiffNAS run (distill, search, retrain, export, report).

With no arguments it runs the default search on the built-in digits teacher on the CPU.
"""
from __future__ import annotations

import argparse
import logging
import sys

from pyevo.config import ConfigError, load_config

# Flags that set one config key each (dest -> dotted key).
FLAGS = {
    "teacher": ("teacher", "'digits' (built-in) or a local diffusers UNet / pipeline folder"),
    "data": ("data", "'digits', an image folder, or 'data-free' (inputs sampled from the teacher)"),
    "rule": ("search.rule", "selection rule: diffnas | block-budget | budget"),
    "budget": ("search.budget", "latency budget as a fraction of the teacher's (block-budget, budget)"),
    "device": ("device", "device the latency is measured (and training runs) on: cpu | cuda[:N]"),
    "dtype": ("dtype", "deployment dtype for latency: float32 | float16 | bfloat16"),
    "batch": ("batch", "deployment batch for latency"),
    "out": ("out", "run folder"),
    "seed": ("seed", "random seed (same seed, same genomes)"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pyevo.search",
        description="DiffNAS: distill a weight-shared supernet from a diffusers UNet, search each block "
                    "under measured latency, retrain the student and export it as a diffusers model.")
    parser.add_argument("--config", help="YAML file of config values (see pyevo/config.py and experiments/)")
    for dest, (key, text) in FLAGS.items():
        parser.add_argument(f"--{dest}", help=f"{text} [config: {key}]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set distill.steps=200 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out, skipping the stages already done")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    overrides = {key: getattr(args, dest) for dest, (key, _) in FLAGS.items() if getattr(args, dest) is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"pyevo.search: error: --set takes KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key.strip()] = value
    # Heavy imports after argument parsing, so --help is quick.
    from pyevo.pipeline import RunError, run
    from pyevo.search.select import BudgetError
    from pyevo.space import UnsupportedBlockError
    from pyevo.teacher import TeacherError

    try:
        config = load_config(args.config, overrides)
        report = run(config, resume=args.resume, progress=not args.quiet)
    except (ConfigError, TeacherError, RunError, BudgetError, UnsupportedBlockError) as error:
        print(f"pyevo.search: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyevo.search: interrupted; finished stages are kept, continue with --resume", file=sys.stderr)
        return 130
    t, s = report["teacher"], report["student"]
    print(f"student: {s['macs'] / t['macs']:.1%} of the teacher's MACs, {s['params'] / t['params']:.1%} of its "
          f"params, latency {s['latency_ms']:.2f} vs {t['latency_ms']:.2f} ms on {report['device']}; "
          f"report in {config.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
