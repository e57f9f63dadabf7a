"""What the study runs: its settings, arms and units of work, each keyed by everything it depends on.

A *unit* is one resumable piece of work with a JSON result (``<state>/units/<name>.json``, small enough to
commit, so that a study can go on in another sitting on another machine); its key is a digest of its spec and
of its dependencies' keys, so a changed setting re-runs what depends on it and nothing else. The bases
(their searches time candidate blocks) and the latency units (phase 2, after every other unit) run alone;
making and evaluating each arm's model, and the teacher's samples, run in parallel.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from pyevo.teacher import BUILT_IN_TEACHERS


@dataclass(frozen=True)
class StudySettings:
    """The study's shape. ``pipeline``: config overrides every pyevo run (and the pruned arms' retraining) takes."""

    name: str = "full"
    teacher: str = "digits"
    targets: tuple[float, ...] = (0.7, 0.5, 0.4, 0.3)  # MACs targets, fractions of the teacher's
    main_target: float = 0.5  # where the ablations and the training seeds are
    random_per_target: int = 3
    training_seeds: tuple[int, ...] = (0, 1, 2)  # at the main target: pyevo, uniform width, Diff-Pruning
    eval_seeds: tuple[int, ...] = (0, 1, 2)
    num_samples: int = 1000
    ddim_steps: int = 50
    latency_batch: int = 64
    latency_repeats: int = 21
    families: tuple[str, ...] = ("pyevo", "ablation", "random", "bk-sdm", "uniform", "diff-pruning")
    pipeline: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


FULL = StudySettings()
# The same command in about three minutes on 2 cores (CI): tiny step counts, one seed, two arms. Its
# figures mean nothing; that every unit runs and the results page is written does.
MINI = StudySettings(
    name="mini", targets=(0.5,), random_per_target=0, training_seeds=(0,), eval_seeds=(0,), num_samples=64,
    ddim_steps=4, latency_batch=8, latency_repeats=3, families=("pyevo", "uniform"),
    pipeline={"distill.steps": 6, "distill.batch_size": 16, "search.population": 8, "search.generations": 1,
              "search.heldout_size": 32, "latency.repeats": 2, "latency.network_repeats": 3, "retrain.steps": 6,
              "retrain.batch_size": 16, "batch": 8})
# The study runs on the built-in teachers (pixel digits, and latent digits: the UNet on the autoencoder's
# latents, every figure on the decoded images).
TEACHERS = BUILT_IN_TEACHERS
DEFAULT_TEACHER = StudySettings.teacher


def study_settings(teacher: str = DEFAULT_TEACHER, mini: bool = False) -> StudySettings:
    """The full study (or its miniature) on one of :data:`TEACHERS`."""
    if teacher not in TEACHERS:
        raise ValueError(f"the study runs on the built-in teachers {', '.join(TEACHERS)}, not {teacher!r}")
    return replace(MINI if mini else FULL, teacher=teacher)


@dataclass(frozen=True)
class Arm:
    """One model the study compares: how it is made, and where it sits in the tables."""

    name: str
    family: str  # pyevo | ablation | random | bk-sdm | uniform | diff-pruning
    label: str  # what the tables call it
    target: float | None  # MACs target (None: not a targeted arm)
    training_seed: int = 0


@dataclass(frozen=True)
class Unit:
    name: str
    kind: str  # base | arm | pruned | teacher | latency
    spec: dict
    deps: tuple[str, ...] = ()
    phase: int = 1  # 2: after every other unit

    @property
    def alone(self) -> bool:
        """Whether the unit runs with nothing else of the study beside it (it times candidates or networks)."""
        return self.kind in ("base", "latency")

    def key(self, dep_keys: dict[str, str]) -> str:
        data = json.dumps([self.kind, self.spec, [dep_keys[d] for d in self.deps]], sort_keys=True, default=str)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


def target_name(target: float) -> str:
    return f"{round(target * 100)}"


def build_plan(settings: StudySettings) -> tuple[list[Unit], list[Arm]]:
    """Every unit in the order the scheduler prefers, and every arm the tables show.

    The order puts first what the main comparisons need: the main target's arms of every family and its
    ablations, then the other targets, then the extra training seeds; each arm's evaluation right after it,
    so that a study stopped part-way has whole rows rather than many unevaluated students.
    """
    arms: list[tuple[Arm, Unit]] = []
    bases: dict[str, Unit] = {}
    order: list[Unit | Arm] = []  # each base just before the first arm that needs it
    main = settings.main_target
    m = target_name(main)
    families = set(settings.families)
    uncapped = {"search.max_params": 1.0}

    def base(name: str, seed: int, extra: dict | None = None) -> str:
        if name not in bases:
            spec = {"seed": seed, "overrides": {**settings.pipeline, **(extra or {})}}
            # Every other unit's key has the teacher in it (in its evaluation or through a base); a base's
            # names it where it is not the default, so that the digits study's keys stay what its results
            # were made under.
            if settings.teacher != DEFAULT_TEACHER:
                spec["teacher"] = settings.teacher
            bases[name] = Unit(f"base-{name}", "base", spec)
            order.append(bases[name])
        return bases[name].name

    def pipeline_arm(arm: Arm, base_unit: str, overrides: dict, genome: dict | None = None) -> None:
        if arm.family in families:
            arms.append((arm, Unit(arm.name, "arm", {"overrides": overrides, "genome": genome}, (base_unit,))))
            order.append(arm)

    def pruned_arm(arm: Arm) -> None:
        if arm.family in families:
            importance = {"uniform": "magnitude", "diff-pruning": "diff-pruning"}[arm.family]
            arms.append((arm, Unit(arm.name, "pruned", {"importance": importance, "target": arm.target,
                                                        "seed": arm.training_seed, "overrides": settings.pipeline})))
            order.append(arm)

    def at_target(t: float) -> None:
        n, caps = target_name(t), {"search.max_macs": t, **uncapped}
        pipeline_arm(Arm(f"pyevo-diffnas-{n}", "pyevo", "pyevo diffnas", t), b0, caps)
        pruned_arm(Arm(f"uniform-{n}", "uniform", "uniform width (L1 channels)", t))
        pruned_arm(Arm(f"diff-pruning-{n}", "diff-pruning", "Diff-Pruning (Taylor, early t)", t))
        for index in range(settings.random_per_target):
            pipeline_arm(Arm(f"random-{n}-{index}", "random", "random genome", t), b0,
                         {"search.max_macs": 1.0, **uncapped}, {"random": {"target": t, "index": index}})
        pipeline_arm(Arm(f"pyevo-budget-{n}", "pyevo", "pyevo budget (latency)", t), b0,
                     {"search.rule": "budget", "search.budget": t, **caps})

    b0 = base("s0", 0)
    at_target(main)
    pipeline_arm(Arm("bk-sdm", "bk-sdm", "BK-SDM removal (2nd resnet/attention of each block, mid block)", None),
                 b0, {"search.max_macs": 1.0, **uncapped}, {"bk-sdm": True})
    caps = {"search.max_macs": main, **uncapped}
    for loss in ("end-only", "static", "hard"):
        pipeline_arm(Arm(f"ablation-loss-{loss}-{m}", "ablation", f"retrain loss {loss}", main), b0,
                     {**caps, "retrain.loss": loss})
    pipeline_arm(Arm(f"ablation-global-{m}", "ablation", "global search (summed NSR under the MACs cap)", main),
                 b0, {"search.rule": "global", **caps})
    # The end target the teacher's default run does not use (the true noise unless its preset says otherwise).
    other_end, label = (("true", "the true noise") if default_end_target(settings) == "teacher"
                        else ("teacher", "teacher's prediction"))
    pipeline_arm(Arm(f"ablation-end-{'noise' if other_end == 'true' else 'teacher'}-{m}", "ablation",
                     f"end target: {label}", main), b0, {**caps, "retrain.end_target": other_end})
    if "ablation" in families:
        pipeline_arm(Arm(f"ablation-teacher-path-{m}", "ablation", "teacher-shaped path in the sandwich", main),
                     base("teacher-path", 0, {"distill.teacher_path": True}), caps)
    for t in settings.targets:
        if t != main:
            at_target(t)
    pipeline_arm(Arm("pyevo-diffnas-nocap", "pyevo", "pyevo diffnas, caps off", None), b0,
                 {"search.max_macs": 1.0, **uncapped})
    for seed in settings.training_seeds:
        if seed == 0:
            continue
        if "pyevo" in families:
            pipeline_arm(Arm(f"pyevo-diffnas-{m}-s{seed}", "pyevo", "pyevo diffnas", main, seed),
                         base(f"s{seed}", seed), caps)
        for family, label in (("uniform", "uniform width (L1 channels)"),
                              ("diff-pruning", "Diff-Pruning (Taylor, early t)")):
            pruned_arm(Arm(f"{family}-{m}-s{seed}", family, label, main, seed))

    units = [Unit("teacher", "teacher", {"seeds": list(settings.eval_seeds), "n": settings.num_samples,
                                         "steps": settings.ddim_steps, "teacher": settings.teacher})]
    # Each arm is evaluated in its own unit, right after it is made (so a unit's result holds everything
    # the tables need, and no later unit needs its weights), beside the teacher's samples from the same
    # noise (drawn once, by the first unit to need them): the evaluation's settings are in its key.
    evaluation = {"seeds": list(settings.eval_seeds), "n": settings.num_samples, "steps": settings.ddim_steps,
                  "teacher": settings.teacher}
    made = {arm.name: unit for arm, unit in arms}
    for item in order:
        if isinstance(item, Unit):
            units.insert(0, item) if item.name == b0 else units.append(item)
        else:
            unit = made[item.name]
            units.append(replace(unit, spec={**unit.spec, "evaluate": evaluation}))
    for arm, _ in arms:
        units.append(Unit(f"latency-{arm.name}", "latency", {"batch": settings.latency_batch,
                                                             "repeats": settings.latency_repeats}, (arm.name,), phase=2))
    return units, [arm for arm, _ in arms]


def default_end_target(settings: StudySettings) -> str:
    """The retraining's end target in the study's runs of its teacher (its preset's, else pyevo's default)."""
    from pyevo.config import load_config

    return load_config(overrides={"teacher": settings.teacher, **settings.pipeline}).retrain.end_target


def unit_keys(units: list[Unit]) -> dict[str, str]:
    """Every unit's key, its dependencies' first (they come earlier in the plan, or are named before use)."""
    by_name = {unit.name: unit for unit in units}
    keys: dict[str, str] = {}

    def key(name: str) -> str:
        if name not in keys:
            unit = by_name[name]
            keys[name] = unit.key({dep: key(dep) for dep in unit.deps})
        return keys[name]

    for unit in units:
        key(unit.name)
    return keys
