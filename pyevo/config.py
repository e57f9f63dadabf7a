"""Run configuration: one dataclass per pipeline stage, loaded from YAML, overridable from the CLI.

Every key is checked: an unknown key or a value of the wrong kind is a ``ConfigError`` naming it,
which the CLI turns into one line and a non-zero exit.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value a user gave is wrong (unknown key, bad type, out of range)."""


@dataclass
class DistillConfig:
    """Block-wise distillation of the supernet (teacher-forced, sandwich rule)."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    random_paths: int = 1  # random paths per step, besides the largest and the smallest
    # The teacher-shaped path too, every step (the sandwich without it trains that path only by chance).
    teacher_path: bool = False
    checkpointing: bool = False  # recompute block activations in the backward (less memory)
    # Steps between mid-stage checkpoints (weights, optimiser, random states) a --resume continues from; 0: none.
    checkpoint_every: int = 50


@dataclass
class LatencyConfig:
    """How candidate blocks and whole networks are timed on the run's device."""

    warmup: int = 2
    repeats: int = 7  # per candidate block in the search
    # Per whole-network timing (the teacher and its blocks at the start, teacher and student at
    # the evaluation): a stem is a small difference of large timings, and there are few of these.
    network_repeats: int = 21
    threads: int = 2  # CPU threads while timing (fixed, so tables are comparable)
    # lean: what pyevo.optimize runs (on CUDA fused GroupNorm+SiLU and CUDA graphs; on the CPU the modules
    # as they are); eager: the modules as they are, replayed as CUDA graphs where cuda_graph is on.
    runtime: str = "lean"
    cuda_graph: bool = False  # eager runtime only (the lean one always replays graphs on CUDA)
    cache: str = "~/.cache/pyevo/latency.json"  # persisted table; "" keeps it in the run folder


@dataclass
class SearchConfig:
    """Per-block NSGA-II over genomes: objectives NSR on a fixed held-out set and latency."""

    population: int = 16
    generations: int = 6
    crossover_prob: float = 0.6
    mutation_prob: float = 0.4
    heldout_size: int = 256
    # diffnas | block-budget | budget | global (the least summed NSR under the caps, latency not considered:
    # DNA-style global selection over every block's evaluated candidates)
    rule: str = "diffnas"
    slack: float = 2.0  # diffnas: NSR <= teacher-shaped NSR * slack
    budget: float = 0.5  # block-budget / budget: fraction of the teacher's latency
    # Caps on the student's MACs and parameters, as fractions of the teacher's (1 = no cap). Where
    # a rule's picks break them, the least-NSR choice of evaluated candidates under them replaces the picks.
    max_macs: float = 0.5
    max_params: float = 0.5
    # ... preferably within this factor of the rule's picks' summed block latency.
    cap_latency_slack: float = 1.2
    # A network genome (encode_network's string form, as report.md prints it) to retrain instead of the
    # rule's picks: a hand-picked architecture in the space (it must meet the caps). "": the rule picks.
    genome: str = ""


@dataclass
class RetrainConfig:
    """Retraining of the assembled student with the dynamic joint loss."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    loss: str = "dynamic"  # dynamic | static | hard | end-only
    lambda_share: float = 0.5  # share of the steps over which lambda decays 1 -> 0
    static_lambda: float = 0.5  # the weight of the block loss for the "static" arm
    ema_decay: float = 0.995
    # L_end against the true target of the teacher's prediction type (noise, velocity or clean
    # image: the paper's loss) or against the teacher's own prediction (output distillation).
    end_target: str = "true"
    # Min-SNR-gamma weights on L_end per sample (Hang et al. 2023; 0: unweighted): min(SNR, gamma) / SNR for
    # epsilon, / (SNR + 1) for v_prediction, min(SNR, gamma) for sample. Less weight on the nearly clean
    # timesteps, where the target says least about the image.
    snr_gamma: float = 0.0
    checkpointing: bool = False  # diffusers' gradient checkpointing in the student (less memory)
    # Steps between mid-stage checkpoints (student, EMA, optimiser, random states) a --resume continues from; 0: none.
    checkpoint_every: int = 250


@dataclass
class EvaluateConfig:
    """Quality of teacher and student: samples from the same noise."""

    num_samples: int = 1000
    ddim_steps: int = 50
    # Feature space of the Fréchet distance and KID: inception | digits | none | auto (digits for
    # digits-shaped images, 1x16x16 or 1x32x32, inception otherwise).
    features: str = "auto"
    inception_weights: str = ""  # a local Inception weights file (torch-fidelity's), for offline use
    # A local CLIP model folder (transformers CLIPModel + CLIPProcessor, e.g. openai/clip-vit-large-patch14
    # downloaded): the CLIP score of a text-conditional teacher's and student's samples against their prompts.
    clip_model: str = ""


@dataclass
class DistributedConfig:
    """Runs launched by torchrun (more than one process; pyevo/distributed.py); unused in one process."""

    # Seconds a rank waits for the others (a collective, or a rank that stopped sending its heartbeat)
    # before the job ends with an error instead of hanging.
    timeout: float = 1800.0


@dataclass
class RunConfig:
    """A whole pyevo run."""

    teacher: str = "digits"  # "digits" (built-in) or a local diffusers UNet / pipeline folder
    scheduler: str = ""  # a scheduler folder; needed for a bare UNet folder, overrides a pipeline's
    # Latent teachers: an AutoencoderKL / VQModel folder (or a pipeline folder with vae/ or vqvae/);
    # "" takes the teacher pipeline's own vae/ or vqvae/ when it has one (else the teacher is pixel).
    vae: str = ""
    vae_posterior: str = "mode"  # AutoencoderKL latents of the images: the posterior's mode, or one draw
    data: str = "digits"  # "digits", an image folder (class sub-folders for labels), or "data-free"
    data_skip_bad: bool = False  # image folders: leave unreadable files out (logged) instead of refusing the run
    # Text-conditional teachers (UNet2DConditionModel): a .txt file of prompts (one a line) for the teacher
    # pipeline's tokenizer/ and text_encoder/, or a safetensors file of pre-computed text states, tensor
    # encoder_hidden_states [N, L, D] (and optionally negative_encoder_hidden_states [1, L, D], the
    # unconditional states for classifier-free guidance; zeros when absent); SDXL-shaped teachers also
    # text_embeds [N, P] and time_ids [N, 6] (and a pipeline's two text encoders). See pyevo/conditions.py.
    conditions: str = ""
    # Classifier-free guidance of text-conditional sampling (data-free trajectories and the evaluation's
    # samples); <= 1 samples the conditional prediction alone. 7.5 is StableDiffusionPipeline's default.
    guidance_scale: float = 7.5
    device: str = "cpu"  # where every stage runs: distill, search, latency, retrain, evaluate
    train_dtype: str = "auto"  # autocast dtype of distill and retrain: auto = bfloat16 on CUDA, float32 on CPU
    dtype: str = "float32"  # deployment dtype for latency: float32 | float16 | bfloat16
    batch: int = 64  # deployment batch for latency
    seed: int = 0
    out: str = "runs/default"
    distill: DistillConfig = field(default_factory=DistillConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> "RunConfig":
        for name, allowed in CHOICES.items():
            _choice(name, _get(self, name), allowed)
        for name, bounds in BOUNDS.items():
            value = _get(self, name)
            if not bounds.holds(value):
                raise ConfigError(f"{name} must be {bounds}, got {value}")
        if self.search.population % 4:  # DEAP's selTournamentDCD takes the population in fours
            raise ConfigError(f"search.population must be a multiple of 4, got {self.search.population}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Bounds:
    """A numeric range: ``low < value`` (or ``<=`` when ``low_closed``) and ``value <= high``."""

    low: float
    high: float = math.inf
    low_closed: bool = True

    def holds(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        return above and value <= self.high and math.isfinite(value)

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>=' if self.low_closed else '>'} {self.low:g}"
        return f"in {'[' if self.low_closed else '('}{self.low:g}, {self.high:g}]"


# The one place each key's allowed values are written down: validate() checks them and
# ``python -m pyevo.search --help`` lists them.
CHOICES: dict[str, tuple[str, ...]] = {
    "latency.runtime": ("eager", "lean"),
    "dtype": ("float32", "float16", "bfloat16"),
    "train_dtype": ("auto", "float32", "bfloat16", "float16"),
    "vae_posterior": ("mode", "sample"),
    "search.rule": ("diffnas", "block-budget", "budget", "global"),
    "retrain.loss": ("dynamic", "static", "hard", "end-only"),
    "retrain.end_target": ("true", "teacher"),
    "evaluate.features": ("auto", "inception", "digits", "none"),
}
POSITIVE = Bounds(1)
BOUNDS: dict[str, Bounds] = {
    "batch": POSITIVE, "guidance_scale": Bounds(0),
    "distill.steps": POSITIVE, "distill.batch_size": POSITIVE, "distill.lr": Bounds(0, low_closed=False),
    "distill.random_paths": Bounds(0), "distill.checkpoint_every": Bounds(0),
    "latency.warmup": Bounds(0), "latency.repeats": POSITIVE, "latency.network_repeats": POSITIVE,
    "latency.threads": POSITIVE,
    "search.population": Bounds(4), "search.generations": POSITIVE, "search.heldout_size": POSITIVE,
    "search.crossover_prob": Bounds(0, 1), "search.mutation_prob": Bounds(0, 1),
    "search.slack": Bounds(1), "search.budget": Bounds(0, 1, low_closed=False),
    "search.max_macs": Bounds(0, 1, low_closed=False), "search.max_params": Bounds(0, 1, low_closed=False),
    "search.cap_latency_slack": Bounds(1),
    "retrain.steps": Bounds(0), "retrain.batch_size": POSITIVE, "retrain.lr": Bounds(0, low_closed=False),
    "retrain.lambda_share": Bounds(0, 1, low_closed=False), "retrain.static_lambda": Bounds(0, 1),
    "retrain.ema_decay": Bounds(0, 1), "retrain.snr_gamma": Bounds(0), "retrain.checkpoint_every": Bounds(0),
    # FD needs a covariance and KID a subset of two: at least two samples.
    "evaluate.num_samples": Bounds(2), "evaluate.ddim_steps": POSITIVE,
    "distributed.timeout": Bounds(0, low_closed=False),
}

# Named sets of overrides applied over the defaults, before a YAML file and --set.
PRESETS: dict[str, dict[str, Any]] = {
    # The whole pipeline in about a minute on a 2-core CPU: to check that a teacher and its data
    # work before a long run. Its student means nothing.
    "quick": {"distill.steps": 10, "search.population": 8, "search.generations": 2, "search.heldout_size": 32,
              "latency.repeats": 3, "latency.network_repeats": 3, "retrain.steps": 10, "retrain.batch_size": 16,
              "distill.batch_size": 16, "evaluate.num_samples": 32, "evaluate.ddim_steps": 5},
    # The built-in latent-digits teacher's run (applied when it is the teacher and no preset is named;
    # experiments/latent_digits_default.md): its 50%-params student needs a longer retraining than the
    # pixel default gives to match the teacher, and learns it best from the teacher's own prediction
    # under Min-SNR-5 weights, with the block-wise term over the first fifth of the steps only; the
    # distillation (0.37 s a step alone on 2 cores, against 0.15 s for a retraining step) is halved so
    # the whole run stays within 15 minutes on a 2-core CPU (11 min 4 s from a fresh clone, session 9).
    "latent-digits": {"distill.steps": 100, "retrain.steps": 3000, "retrain.lr": 1e-3, "retrain.end_target": "teacher",
                      "retrain.snr_gamma": 5.0, "retrain.lambda_share": 0.2},
}
# Built-in teachers whose default run has a preset of its own.
TEACHER_PRESETS: dict[str, str] = {"latent-digits": "latent-digits"}


def config_values(config: RunConfig) -> dict[str, Any]:
    """Every setting of ``config`` by its dotted key (as ``--set`` names it)."""
    values: dict[str, Any] = {}

    def walk(section: Any, prefix: str) -> None:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            else:
                values[prefix + f.name] = value

    walk(config, "")
    return values


def describe_keys() -> list[tuple[str, Any, str]]:
    """Every config key, its default, and its allowed values (for --help)."""
    return [(key, value, " | ".join(CHOICES[key]) if key in CHOICES else str(BOUNDS[key]) if key in BOUNDS
             else "true | false" if isinstance(value, bool) else "")
            for key, value in config_values(RunConfig()).items()]


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, "
                              f"got {value!r}") from None
        if kind is int and float(value) != number:
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return number
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{name} cannot be set this way")


def _set(config: Any, dotted: str, value: Any, prefix: str = "") -> None:
    """Set ``dotted`` (relative to ``config``, which is the section ``prefix`` names) to ``value``."""
    parts = dotted.split(".")
    target = config
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(target)}
        if part not in fields:
            where = prefix + ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"unknown config key {prefix + dotted!r} (no {part!r} in {where.rstrip('.')}; "
                              f"known: {', '.join(fields)})")
        hints = typing.get_type_hints(type(target))
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(hints[part]):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted} is a section; give it a mapping")
                for key, item in value.items():
                    _set(getattr(target, part), str(key), item, f"{prefix}{dotted}.")
            else:
                setattr(target, part, _coerce(prefix + dotted, value, hints[part]))
            return
        if not dataclasses.is_dataclass(hints[part]):
            raise ConfigError(f"unknown config key {dotted!r} ({'.'.join(parts[:depth + 1])} "
                              "is not a section)")
        target = getattr(target, part)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                preset: str | None = None) -> RunConfig:
    """The defaults, then the ``preset``, then the YAML file at ``path``, then ``overrides`` (dotted keys).

    Without a ``preset``, a built-in teacher named by the YAML file or the overrides brings its own
    (``TEACHER_PRESETS``): the settings its default run was measured with.
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    config = _assemble(preset, data, overrides or {})
    if preset is None and config.teacher in TEACHER_PRESETS:
        config = _assemble(TEACHER_PRESETS[config.teacher], data, overrides or {})
    return config.validate()


def _assemble(preset: str | None, data: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    config = RunConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            _set(config, key, value)
    for key, value in data.items():
        _set(config, str(key), value)
    for key, value in overrides.items():
        _set(config, key, value)
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {getattr(error, 'strerror', None) or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: "
                          f"{str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def save_config(config: RunConfig, path: str | Path) -> None:
    from pyevo.runfolder import atomic_write_text  # (torch) only when a run saves its config

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
