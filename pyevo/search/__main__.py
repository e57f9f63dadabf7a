"""``python -m pyevo.search``: the whole DiffNAS run (distill, search, retrain, export, report).

With no arguments it runs the default search on the built-in digits teacher on the CPU.
"""
from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

import yaml

from pyevo.config import PRESETS, ConfigError, RunConfig, describe_keys, load_config
from pyevo.config import _read_yaml as read_yaml

# Flags that set one config key each (dest -> dotted key).
FLAGS = {
    "teacher": ("teacher", "'digits' (built-in), a diffusers pipeline folder (unet/ + scheduler/) or a bare "
                           "UNet2DModel / UNet2DConditionModel folder (then --scheduler too)"),
    "scheduler": ("scheduler", "scheduler folder (scheduler_config.json): the teacher's noise schedule and "
                               "prediction type; needed with a bare UNet folder"),
    "vae": ("vae", "latent teachers: an AutoencoderKL or VQModel folder (or a pipeline folder with vae/ or "
                   "vqvae/) that encodes the data and decodes samples; default: the teacher pipeline's own"),
    "data": ("data", "'digits', an image folder (class-conditional teachers: one sub-folder per class; "
                     "text-conditional ones: each name.png with its caption in name.txt), or 'data-free' "
                     "(inputs sampled from the teacher)"),
    "conditions": ("conditions", "text-conditional teachers (UNet2DConditionModel): a .txt file of prompts (one a "
                                 "line) for the teacher pipeline's tokenizer/ and text_encoder/, or a safetensors "
                                 "file of pre-computed text states, encoder_hidden_states [N, L, D] (D = the UNet's "
                                 "cross_attention_dim), optionally negative_encoder_hidden_states [1, L, D] for "
                                 "guidance (else zeros); SDXL-shaped teachers also take text_embeds [N, P] and "
                                 "time_ids [N, 6] (optionally negative_text_embeds, negative_time_ids), and their "
                                 "prompts are encoded by tokenizer_2/ and text_encoder_2/ as well; data-free runs "
                                 "sample the teacher at these states"),
    "guidance_scale": ("guidance_scale", "text-conditional teachers: classifier-free guidance scale of the "
                                         "data-free and evaluation samples (<= 1: no guidance)"),
    "rule": ("search.rule", "selection rule: diffnas | block-budget | budget | global"),
    "budget": ("search.budget", "latency budget as a fraction of the teacher's (block-budget, budget)"),
    "device": ("device", "where every stage runs: distillation, held-out NSR, search, latency, retraining, "
                         "sampling and evaluation: cpu | cuda[:N]"),
    "train_dtype": ("train_dtype", "autocast dtype of distillation and retraining (weights stay float32): "
                                   "auto (bfloat16 on CUDA, float32 on the CPU) | float32 | bfloat16 | float16"),
    "dtype": ("dtype", "deployment dtype, for latency only: float32 | float16 | bfloat16"),
    "batch": ("batch", "deployment batch, for latency only"),
    "metric_features": ("evaluate.features", "feature space of FD and KID: auto | inception | digits | none"),
    "out": ("out", "run folder"),
    "seed": ("seed", "random seed (same seed, same genomes)"),
}


# Writes that fail for a reason the user can remove: a full disk or quota, a file too large, no permission,
# a read-only file system. What was written before stays (every artifact is written atomically).
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
WRITE_ERRNOS = FULL | {errno.EACCES, errno.EPERM, errno.EROFS}


def write_failure(error: OSError, out: str) -> str:
    """The one line for a write that failed: which file, why, and how to go on."""
    what = "free some space" if error.errno in FULL else "make it writable"
    go_on = ("continue with --resume (finished stages are kept)" if (Path(out).expanduser() / "config.yaml").is_file()
             else "run again")
    return f"cannot write {error.filename or out}: {error.strerror or error}; {what} and {go_on}"


def run_config(args: argparse.Namespace, overrides: dict) -> RunConfig:
    """The run's config: the defaults, ``--preset``, ``--config`` and the flags; on ``--resume`` the run's
    saved config (``<out>/config.yaml``) takes the defaults' place, so ``--out DIR --resume`` alone continues
    the run as it was configured, and whatever else the command line gives is a change to it."""
    saved = Path(str(overrides.get("out", RunConfig().out))).expanduser() / "config.yaml"
    data = None
    if args.resume and saved.is_file():
        try:
            data = yaml.safe_load(saved.read_text())
        except (OSError, yaml.YAMLError):
            data = None  # the run's own check of the folder says what is wrong with it
    if not isinstance(data, dict):
        return load_config(args.config, overrides, args.preset)
    known = _dotted(RunConfig().to_dict())
    base = {key: value for key, value in _dotted(data).items() if key in known and key != "out"}
    if args.preset is not None and args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    given = {**(PRESETS[args.preset] if args.preset else {}),
             **(_dotted(read_yaml(Path(args.config))) if args.config else {}), **overrides}
    return load_config(None, {**base, **given})


def _dotted(tree: dict, prefix: str = "") -> dict:
    """A nested config mapping as {dotted key: value}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pyevo.search", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="DiffNAS: distill a weight-shared supernet from a diffusers UNet, search each block "
                    "under measured latency, retrain the student and export it as a diffusers model.",
        epilog=config_keys_help())
    parser.add_argument("--config", help="YAML file of config values (see pyevo/config.py and experiments/)")
    parser.add_argument("--preset", help=f"a named set of config values applied first: {', '.join(PRESETS)} "
                                         "(quick: the whole pipeline in about a minute, to check a teacher and its data; "
                                         "latent-digits: that built-in teacher's own, applied when it is the teacher "
                                         "and no preset is named)")
    for dest, (key, text) in FLAGS.items():
        parser.add_argument(f"--{dest.replace('_', '-')}", dest=dest, help=f"{text} [config: {key}]")
    parser.add_argument("--data-skip-bad", action="store_true",
                        help="image folders: leave out files that cannot be read (counted in the log) instead of "
                             "refusing the run [config: data_skip_bad]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set distill.steps=200 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last finished stage or checkpoint, with its saved "
                             "config (other flags change it: a change the distillation depends on is refused)")
    parser.add_argument("--show-config", action="store_true",
                        help="print the resolved config (defaults, preset, --config, flags, --set) as YAML and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    return parser.parse_args(argv)


def config_keys_help() -> str:
    """Every config key with its default and allowed values, for the end of --help."""
    rows = describe_keys()
    width = max(len(key) for key, _, _ in rows)
    lines = ["config keys (set with --set KEY=VALUE or in a --config YAML file):"]
    for key, default, allowed in rows:
        lines.append(f"  {key:<{width}}  default {default!r}" + (f"; {allowed}" if allowed else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pyevo.distributed import rank_from_env

    rank = rank_from_env()  # under torchrun: the other ranks log errors only (rank 0 speaks for the job)
    logging.basicConfig(level=logging.ERROR if rank else logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    overrides = {key: getattr(args, dest) for dest, (key, _) in FLAGS.items() if getattr(args, dest) is not None}
    if args.data_skip_bad:
        overrides["data_skip_bad"] = True
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"pyevo.search: error: --set takes KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key.strip()] = value
    if args.show_config:
        try:
            config = run_config(args, overrides)
        except ConfigError as error:
            print(f"pyevo.search: error: {error}", file=sys.stderr)
            return 2
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    # Heavy imports after argument parsing, so --help is quick.
    from pyevo.pipeline import RunError, run
    from pyevo.search.select import BudgetError
    from pyevo.space import UnsupportedBlockError
    from pyevo.conditions import ConditionsError
    from pyevo.teacher import TeacherError  # AutoencoderError is one
    from pyevo.training import NonFiniteError
    from pyevo.distributed import DistributedError, PeerFailed
    from pyevo.latency import LatencyCacheError
    from torch.distributed import DistError

    user_errors = (ConfigError, TeacherError, ConditionsError, RunError, BudgetError, UnsupportedBlockError,
                   LatencyCacheError)
    where = f" (rank {rank})" if rank else ""

    def say(error: BaseException, text: str | None = None) -> None:
        # Under torchrun an error every rank meets is printed once (by the rank that met it first).
        if not getattr(error, "pyevo_quiet", False):
            print(f"pyevo.search: error{where}: {text or error}", file=sys.stderr)

    config = None
    try:
        config = run_config(args, overrides)
        report = run(config, resume=args.resume, progress=not args.quiet)
    except user_errors as error:
        say(error)
        return 2
    except NonFiniteError as error:
        say(error)
        return 1
    except PeerFailed as error:  # another rank failed where the ranks meet; it printed its error
        say(error)
        return 2 if error.kind in {kind.__name__ for kind in user_errors} else 1
    except (DistributedError, DistError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        say(error, f"{first} (another rank died or stopped answering; its own output says why)")
        return 1
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        say(error, write_failure(error, config.out if config else overrides.get("out", "")))
        return 2
    except KeyboardInterrupt:
        print("pyevo.search: interrupted; finished stages and the last checkpoint are kept, continue with --resume",
              file=sys.stderr)
        return 130
    if report is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    t, s = report["teacher"], report["student"]
    print(f"student: {s['macs'] / t['macs']:.1%} of the teacher's MACs, {s['params'] / t['params']:.1%} of its "
          f"params, latency {s['latency_ms']:.2f} vs {t['latency_ms']:.2f} ms on {report['device']}; "
          f"report in {config.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
