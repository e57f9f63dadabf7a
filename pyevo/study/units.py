"""How each kind of unit of the study runs (one process per unit; :mod:`pyevo.study.__main__` schedules them).

Every unit works in its own folder ``<out>/<name>/`` and returns a JSON-able result. Pipeline units
(bases and in-space arms) are pyevo runs, resumed with ``--resume`` semantics, so a killed unit goes on
from its last checkpoint; an arm starts from a copy of its base's distillation and search. An arm's unit
makes its model and evaluates it, and its result names the architecture, so that nothing later needs the
model's weights: the latency units rebuild the architecture (latency does not depend on the weights).

Only the results and what makes a base reproducible (its saved config and teacher timings, and the latency
table its search read) are kept in the state folder; a base whose work folder is gone (another sitting, on
another machine) is distilled and searched again from them, and its result records the digest of its
search so that the page can tell whether its arms came from one search.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from pyevo.config import RunConfig, load_config
from pyevo.runfolder import atomic_write_bytes, atomic_write_json, read_json
from pyevo.study.plan import StudySettings, Unit

log = logging.getLogger(__name__)

# What an arm copies from its base: the run's config and teacher timings, its distillation and search,
# and (latent teachers) its encoded images. The arm's own selection, retraining and student follow.
BASE_FILES = ("config.yaml", "timings.json", "encode.json", "latents.safetensors", "distill.json",
              "supernet.safetensors", "search.json", "select.json")
# Random genomes: drawn uniformly from the space until one lands this far under the target (MACs ratio).
RANDOM_WINDOW = 0.05
RANDOM_POOL, RANDOM_CHUNK, RANDOM_CHUNKS = 256, 1_000_000, 20


@dataclasses.dataclass
class StudyContext:
    out: Path  # work folders (models, run folders, samples, logs): not kept
    state: Path  # units' results, the bases' teacher timings, the latency table: small, committed with the page
    settings: StudySettings
    units: dict[str, Unit]
    keys: dict[str, str]  # each unit's key (pyevo.study.plan.unit_keys)

    def folder(self, name: str) -> Path:
        return self.out / name

    def result_path(self, name: str) -> Path:
        return self.state / "units" / f"{name}.json"

    def result(self, name: str) -> dict:
        """A finished dependency's result, read only where it holds the unit's current key (a runner
        must not build on another setting's)."""
        record = self.stored(name)
        if record is None:
            raise RuntimeError(f"unit {name!r} has no result under its current setting: run it first")
        return record["result"]

    def stored(self, name: str) -> dict | None:
        """The unit's stored record (key, seconds, code, result) where it holds the unit's current key; None
        where there is none, it cannot be read, or it is another setting's."""
        try:
            data = read_json(self.result_path(name))
        except (OSError, ValueError):
            return None
        return data if data.get("key") == self.keys.get(name) else None


# Pipeline settings that are the unit's own (its seed and folder) or the study's (the teacher, the shared
# latency table), or that change no figure: not part of the defaults a study's units ran under.
UNIT_OWN_KEYS = ("teacher", "seed", "out", "latency.cache", "distributed.timeout")
PIPELINE_DEFAULTS = "pipeline_defaults.json"


def pipeline_defaults(teacher: str) -> dict[str, Any]:
    """Every pipeline setting a unit of the study inherits rather than names in its spec (dotted key -> value, as
    JSON has it). Units' keys hold their specs only, so a change here is recorded beside them instead."""
    from pyevo.config import config_values

    values = config_values(load_config(overrides={"teacher": teacher}))
    return json.loads(json.dumps({key: value for key, value in values.items() if key not in UNIT_OWN_KEYS},
                                 default=str))


def changed_pipeline_defaults(context: StudyContext) -> list[str]:
    """The pipeline defaults that differ from those the state's finished units ran under ("key: was -> now"),
    recorded on first use. A state from before the record takes today's defaults as its own."""
    path = context.state / PIPELINE_DEFAULTS
    now = pipeline_defaults(context.settings.teacher)
    try:
        recorded = read_json(path)
    except FileNotFoundError:
        atomic_write_json(path, now)
        return []
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        return [f"{path.name} is not a JSON object of settings"]
    return [f"{key}: {recorded.get(key, '(none)')!r} -> {now.get(key, '(none)')!r}"
            for key in sorted(set(recorded) | set(now)) if recorded.get(key) != now.get(key)]


def study_teacher(name: str):
    """The study's teacher, its schedule, its autoencoder (None for a pixel teacher) and the size of the images
    every figure is taken on (a latent teacher's decoded ones)."""
    from pyevo.autoencoder import image_shape, teacher_autoencoder
    from pyevo.teacher import load_teacher

    teacher, scheduler = load_teacher(name)
    codec = teacher_autoencoder(name)
    return teacher, scheduler, codec, image_shape(teacher, codec)[-1]


def training_set(config: RunConfig, teacher, scheduler, codec, folder: Path):
    """What the pruned arms prune and retrain on: the training digits, or (a latent teacher) their latents,
    encoded as a pyevo run encodes them (the run's posterior and seed) and written to ``folder``."""
    from pyevo.pipeline import encode_images, load_images

    train, _, _, _ = load_images(config, teacher, scheduler, codec)
    if codec is None:
        return train
    folder.mkdir(parents=True, exist_ok=True)
    return encode_images(codec, {"train": train}, config.vae_posterior, config.seed,
                         folder / "latents.safetensors")["train"]


def pipeline_config(context: StudyContext, overrides: dict[str, Any], seed: int, folder: Path) -> RunConfig:
    """A pyevo run of the study's teacher: the study's overrides, the unit's seed and folder, and one latency
    table shared by every unit (merged under a lock)."""
    return load_config(overrides={"teacher": context.settings.teacher, **overrides, "seed": seed, "out": str(folder),
                                  "latency.cache": str(context.state / "latency_table.json")})


def stage_seconds(folder: Path, base: Path | None = None) -> dict[str, float]:
    """The seconds of each stage the run in ``folder`` ran itself (not those read back from ``base``'s copies)."""
    seconds = {}
    for stage in ("encode", "distill", "search", "select", "retrain"):
        path = folder / f"{stage}.json"
        if not path.is_file():
            continue
        result = read_json(path)
        copied = base is not None and (base / path.name).is_file() and read_json(base / path.name)["key"] == result["key"]
        if not copied:
            seconds[stage] = result["seconds"]
    return seconds


def run_base(unit: Unit, context: StudyContext) -> dict:
    """A pyevo run distilled, searched and selected (its arms resume copies of it). Where the state holds this
    base's saved config and teacher timings from an earlier sitting, the run starts from them (a resumed run
    reads its teacher timings back), so its search scores candidates on the same scale, from the same table."""
    from pyevo import pipeline
    from pyevo.runfolder import file_digest

    folder, kept = context.folder(unit.name), context.state / "bases" / unit.name
    if not (folder / "config.yaml").is_file() and (kept / "config.yaml").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "timings.json"):
            shutil.copy2(kept / name, folder / name)
    config = pipeline_config(context, unit.spec["overrides"], unit.spec["seed"], folder)
    pipeline.run(config, resume=(folder / "config.yaml").is_file(), progress=False, until="select")
    kept.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "timings.json"):
        shutil.copy2(folder / name, kept / name)
    return {"stages": stage_seconds(folder), "search_sha256": file_digest(folder / "search.json"),
            "supernet_sha256": file_digest(folder / "supernet.safetensors")}


def base_ready(unit: Unit, context: StudyContext) -> bool:
    """Whether the base's work folder still holds what its arms copy."""
    folder = context.folder(unit.name)
    return all((folder / name).is_file() for name in ("supernet.safetensors", "search.json", "select.json"))


def run_arm(unit: Unit, context: StudyContext) -> dict:
    """An in-space student: its base's search, this arm's selection (or genome), pyevo's retraining."""
    from pyevo import pipeline

    base = context.units[unit.deps[0]]
    folder, base_folder = context.folder(unit.name), context.folder(base.name)
    overrides = {**base.spec["overrides"], **unit.spec["overrides"]}
    drawn = None
    if unit.spec.get("genome"):
        genome, drawn = arm_genome(unit.spec["genome"], context.settings.teacher)
        overrides["search.genome"] = genome
    if not (folder / "config.yaml").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name in BASE_FILES:
            if (base_folder / name).is_file():
                shutil.copy2(base_folder / name, folder / name)
    config = pipeline_config(context, overrides, base.spec["seed"], folder)
    pipeline.run(config, resume=True, progress=False, until="retrain")
    selected = read_json(folder / "select.json")
    from pyevo.student import load_student

    start = time.perf_counter()
    quality = evaluate_model(load_student(folder / "student", low_cpu_mem_usage=False).eval(), unit, context)
    stages = {**stage_seconds(folder, base_folder), "evaluate": round(time.perf_counter() - start, 2)}
    return {"genome": selected["genome"], "rule": selected["rule"], "selected_macs_ratio": selected["macs_ratio"],
            "latency_estimate_ratio": selected["latency_estimate_ms"] / selected["teacher_ms"],
            "base_search_sha256": context.result(base.name)["search_sha256"], "random_draws": drawn,
            **quality, "stages": stages}


def arm_genome(spec: dict, teacher_name: str, pool: int = 0) -> tuple[str, int | None]:
    """The network genome of a fixed-genome arm, and for a random one how many draws it took (from pools of
    ``pool`` genomes per block; default ``RANDOM_POOL``)."""
    from pyevo.pipeline import BlockCoster, network_cost
    from pyevo.space import encode_network, unet_space
    from pyevo.supernet import build_supernet
    from pyevo.teacher import load_teacher

    teacher, _ = load_teacher(teacher_name)
    spaces = unet_space(teacher)
    if "bk-sdm" in spec:
        return encode_network({s.name: bk_sdm_genome(s) for s in spaces}, spaces), None
    supernet = build_supernet(teacher)
    coster = BlockCoster(teacher, 0)
    teacher_macs = network_cost(teacher).macs
    stem = teacher_macs - sum(coster(s.name, supernet[s.name], s, s.teacher_genome()).macs for s in spaces)
    target, index = spec["random"]["target"], spec["random"]["index"]
    # Uniform draws of whole genomes land under 40% of the teacher's MACs about once in a thousand (their
    # mean is 75% on the digits teacher): each block draws a pool of uniform genomes once, and networks are
    # drawn uniformly from the pools' combinations (costs summed, not counted again) until one lands in the
    # window: a uniform draw from the space under the target, up to the pools' size.
    rng = random.Random(f"pyevo-study-random-{target}-{index}")
    pool = pool or RANDOM_POOL
    pools = [[s.random_genome(rng) for _ in range(pool)] for s in spaces]
    costs = np.array([[coster(s.name, supernet[s.name], s, g).macs for g in members]
                      for s, members in zip(spaces, pools)], dtype=np.float64)
    draws = np.random.default_rng(rng.randrange(2 ** 32))
    rows = np.arange(len(spaces))
    for chunk in range(RANDOM_CHUNKS):
        picks = draws.integers(0, pool, size=(RANDOM_CHUNK, len(spaces)))
        ratios = (stem + costs[rows, picks].sum(axis=1)) / teacher_macs
        hits = np.flatnonzero((ratios >= target - RANDOM_WINDOW) & (ratios <= target))
        if len(hits):
            first = int(hits[0])
            genomes = {s.name: pools[b][int(picks[first, b])] for b, s in enumerate(spaces)}
            return encode_network(genomes, spaces), chunk * RANDOM_CHUNK + first + 1
    raise RuntimeError(f"no random genome within {RANDOM_WINDOW} under MACs {target} in "
                       f"{RANDOM_CHUNKS * RANDOM_CHUNK} draws")


def bk_sdm_genome(space) -> tuple[int, ...]:
    """BK-SDM-style removal (Kim et al. 2023): the teacher's block without its second resnet and second
    attention, and the mid block removed altogether (its resnets skipped, its attentions dropped)."""
    genes = list(space.teacher_genome())
    whole = space.name == "mid_block"
    for index in range(len(space.resnets)):
        if whole or index == 1:
            genes[3 * index + 2] = 0  # the width gene's 0 is "skip": the shortcut alone
    offset = 3 * len(space.resnets)
    for index in range(len(space.attentions)):
        if whole or index == 1:
            genes[offset + index] = 0  # "drop": the identity
    return space.canonical(tuple(genes))


def run_pruned(unit: Unit, context: StudyContext) -> dict:
    """A structurally pruned teacher (uniform width or Diff-Pruning), retrained with the end loss alone under
    pyevo's retraining schedule (its block outputs have other widths than the teacher's: no block term)."""
    from pyevo.retrain import retrain_student
    from pyevo.study.pruning import prune_unet, save_pruned
    from pyevo.training import StepCheckpoints, resolve_train_dtype

    folder = context.folder(unit.name)
    config = pipeline_config(context, unit.spec["overrides"], unit.spec["seed"], folder)
    teacher, scheduler, codec, _ = study_teacher(config.teacher)
    train = training_set(config, teacher, scheduler, codec, folder)
    start = time.perf_counter()
    model, info = prune_unet(teacher, unit.spec["target"], unit.spec["importance"], train, scheduler, config.seed)
    pruned_seconds = time.perf_counter() - start
    retrain_config = dataclasses.replace(config.retrain, loss="end-only")
    start = time.perf_counter()
    key = context.keys[unit.name]
    history = retrain_student(teacher, model, train, scheduler, retrain_config, config.seed, progress=False,
                              train_dtype=resolve_train_dtype(config.train_dtype, config.device),
                              checkpoints=StepCheckpoints(folder / "checkpoints", key, retrain_config.checkpoint_every))
    retrain_seconds = time.perf_counter() - start
    save_pruned(model, folder / "student")
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    start = time.perf_counter()
    quality = evaluate_model(model.eval(), unit, context)
    return {"pruning": info, "final_loss": history[-1]["loss"] if history else None, **quality,
            "stages": {"prune": round(pruned_seconds, 2), "retrain": round(retrain_seconds, 2),
                       "evaluate": round(time.perf_counter() - start, 2)}}


def teacher_samples(context: StudyContext, seed: int, n: int, steps: int) -> torch.Tensor:
    """The teacher's ``n`` DDIM samples of ``steps`` steps at noise ``seed``: drawn once, by whichever unit needs
    them first (the others wait on a lock, then read them), and kept in the work folder."""
    import fcntl

    from pyevo.sample import sample_images

    folder = context.out / "teacher-samples" / f"{context.settings.teacher}-n{n}-steps{steps}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"seed-{seed}.safetensors"
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            teacher, scheduler, codec, _ = study_teacher(context.settings.teacher)
            samples = sample_images(teacher, scheduler.config, n, steps, seed, codec, progress=False)
            atomic_write_bytes(path, safetensors.torch.save({"samples": samples.contiguous()}))
    return safetensors.torch.load_file(path)["samples"]


def run_teacher(unit: Unit, context: StudyContext) -> dict:
    """The teacher's figures at every evaluation seed and its quality bar (class-balanced FD against the
    real-vs-real floor, class shares)."""
    from pyevo.pipeline import network_cost
    from pyevo.study.quality import DigitsReference, sample_figures
    from pyevo.teachers.evaluate import TeacherEvalConfig, evaluate_samples

    teacher, _, _, size = study_teacher(unit.spec["teacher"])
    reference = DigitsReference(size)
    per_seed, bar = {}, {}
    for seed in unit.spec["seeds"]:
        samples = teacher_samples(context, seed, unit.spec["n"], unit.spec["steps"])
        per_seed[str(seed)] = sample_figures(samples, None, reference, seed)
        checked = evaluate_samples(samples, 0.0, TeacherEvalConfig(n_samples=unit.spec["n"], steps=unit.spec["steps"],
                                                                   seed=seed, bar="balanced"), image_size=size)
        bar[str(seed)] = {"balanced_fd": checked.fd_balanced_samples, "balanced_floor": checked.fd_balanced_train,
                          "balanced_ratio": checked.fd_balanced_samples / checked.fd_balanced_train,
                          "fd": checked.fd_samples, "fd_floor": checked.fd_floor,
                          "fd_iid_reference": checked.fd_iid_reference, "class_shares": checked.class_shares,
                          "passed": checked.passed}
    cost = network_cost(teacher)
    return {"per_seed": per_seed, "bar": bar, "macs": cost.macs, "params": cost.params}


def evaluate_model(model, unit: Unit, context: StudyContext) -> dict:
    """The model's figures at each evaluation seed beside the teacher's samples from the same noise
    (:mod:`pyevo.study.quality`), and its MACs and params against the teacher's."""
    from pyevo.pipeline import network_cost
    from pyevo.sample import sample_images
    from pyevo.study.quality import DigitsReference, sample_figures

    spec = unit.spec["evaluate"]
    teacher, scheduler, codec, size = study_teacher(context.settings.teacher)
    reference = DigitsReference(size)
    per_seed = {}
    for seed in spec["seeds"]:
        samples = sample_images(model, scheduler.config, spec["n"], spec["steps"], seed, codec, progress=False)
        if not bool(torch.isfinite(samples).all()):
            raise RuntimeError(f"{unit.name}: its samples at seed {seed} are not finite")
        per_seed[str(seed)] = sample_figures(samples, teacher_samples(context, seed, spec["n"], spec["steps"]),
                                             reference, seed)
    cost, teacher_cost = network_cost(model), network_cost(teacher)
    return {"per_seed": per_seed, "macs": cost.macs, "params": cost.params,
            "macs_ratio": cost.macs / teacher_cost.macs, "params_ratio": cost.params / teacher_cost.params}


def rebuild_architecture(arm: Unit, context: StudyContext):
    """The arm's model with the architecture its result names and weights that do not matter (for timing):
    an in-space arm's student assembled from an undistilled supernet; a pruned arm pruned again (pruning is
    deterministic given its seed; its MACs are checked against the recorded ones)."""
    from pyevo.pipeline import network_cost

    result = context.result(arm.name)
    teacher, scheduler, codec, _ = study_teacher(context.settings.teacher)
    if arm.kind == "arm":
        from pyevo.space import decode_network, unet_space
        from pyevo.student import student_class
        from pyevo.supernet import build_supernet

        genomes = decode_network(result["genome"], unet_space(teacher))
        model = student_class(teacher).from_supernet(teacher, build_supernet(teacher), genomes)
    else:
        from pyevo.study.pruning import prune_unet

        config = pipeline_config(context, arm.spec["overrides"], arm.spec["seed"], context.folder(arm.name))
        train = training_set(config, teacher, scheduler, codec, context.folder(arm.name))
        model, _ = prune_unet(teacher, arm.spec["target"], arm.spec["importance"], train, scheduler, config.seed)
    if network_cost(model).macs != result["macs"]:
        raise RuntimeError(f"{arm.name}: the rebuilt architecture has {network_cost(model).macs} MACs, the arm's "
                           f"result {result['macs']}: it is not the architecture that was evaluated")
    return model.eval()


def run_latency(unit: Unit, context: StudyContext) -> dict:
    """The model's whole forward beside the teacher's, timed in turn (one machine state for both), at the
    study's batch in float32 on the CPU."""
    from contextlib import ExitStack

    from pyevo.evaluate import deployed
    from pyevo.latency import time_calls
    from pyevo.teacher import load_teacher

    arm = context.units[unit.deps[0]]
    teacher, _ = load_teacher(context.settings.teacher)
    model = rebuild_architecture(arm, context)
    threads = torch.get_num_threads()
    with ExitStack() as stack:
        fns = {name: stack.enter_context(deployed(net, unit.spec["batch"], "float32", "cpu"))[0]
               for name, net in (("teacher", teacher), ("model", model))}
        times = time_calls(fns, "cpu", warmup=3, repeats=unit.spec["repeats"], threads=threads)
    return {"teacher_ms": times["teacher"], "model_ms": times["model"], "ratio": times["model"] / times["teacher"],
            "threads": threads, "batch": unit.spec["batch"]}


RUNNERS = {"base": run_base, "arm": run_arm, "pruned": run_pruned, "teacher": run_teacher, "latency": run_latency}
# What a unit's result alone does not keep, and later units need from its work folder (else it runs again).
READY = {"base": base_ready}
