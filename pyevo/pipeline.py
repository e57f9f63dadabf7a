"""The whole DiffNAS run, stage by stage, in one run folder.

teacher -> supernet + distill -> per-block search -> selection -> retrain -> evaluate -> report

Each stage writes its result atomically. A stage's result records the configuration it depends on
(its *key*, chained through the stages before it); on ``--resume`` a stage whose result exists with
the same key is read back instead of run again, so an interrupted run loses at most the stage in
progress, and changing, say, the selection rule re-runs selection and what follows, not the search.
Everything a user can get wrong (teacher, data, config, an impossible budget) is checked before
the run folder is created.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch

from pyevo import distributed
from pyevo.conditions import (Conditions, added_condition_rows, caption_conditions, condition_rows, guidance,
                              load_conditions, warn_of_zero_guidance, with_unconditional_rows)
from pyevo.config import ConfigError, RunConfig, save_config
from pyevo.cost import count_macs, count_params
from pyevo.diffusion import ImageSet, balanced_labels, uniform_labels
from pyevo.distill import block_nsr, distill_supernet, heldout_calls
from pyevo.autoencoder import LatentCodec, check_latent_teacher, image_shape, teacher_autoencoder
from pyevo.metrics import ClipUnavailable, clip_score, load_clip_model
from pyevo.evaluate import (decode_latency, network_latency, paired_similarity, per_class_similarity, quality_features,
                            sample_quality)
from pyevo.latency import DTYPES, LatencyTable, device_name, fingerprint, time_calls, timing_setup
from pyevo.retrain import retrain_student
from pyevo.runfolder import (atomic_write_bytes, atomic_write_json, file_digest, folder_write_error, read_json,
                             tensor_digest, user_umask)
from pyevo.runtime import replays_graphs, timed_under
from pyevo.sample import ddim_sample, sample_images
from pyevo.search.local import BlockSearchResult, Candidate, search_block
from pyevo.search.population import block_evaluator
from pyevo.search.select import (BudgetError, Cost, latency_guard, meet_cost_caps, select_block_budget, select_budget,
                                 select_diffnas, select_global)
from pyevo.space import BlockSpace, decode_network, encode_network, unet_space
from pyevo.student import build_static_block, student_class
from pyevo.supernet import build_supernet
from pyevo.teacher import (BlockCall, conditioning, is_class_conditional, is_text_conditional, load_teacher,
                           model_device, num_class_embeds, probe_labels, record_blocks, resolve_teacher_folder,
                           sample_shape)
from pyevo.training import NonFiniteError, StepCheckpoints, resolve_train_dtype

log = logging.getLogger(__name__)


class RunError(ValueError):
    """The run cannot start or go on as asked (e.g. its folder holds a different run)."""


# -------------------------------------------------------------------------------------- inputs
def load_images(config: RunConfig, teacher, scheduler, codec: LatentCodec | None = None,
                conditions: Conditions | None = None
                ) -> tuple[ImageSet, ImageSet, ImageSet | None, Conditions | None]:
    """Training images, held-out images (for NSR), the reference set for FD/KID, with labels where
    the teacher is class-conditional and text states where it is text-conditional, and the run's text
    conditions: ``conditions`` as given, or, from a caption folder, its captions' states.

    For a latent teacher (``codec``) the images are at the autoencoder's image size, to be encoded
    by :func:`encode_images`, and the reference stays in image space; data-free sets are the
    teacher's own samples, latents already.
    """
    shape = image_shape(teacher, codec)
    channels, *size = shape
    conditional = is_class_conditional(teacher)
    classes = num_class_embeds(teacher)
    what = "the teacher takes" if codec is None else f"the teacher's {codec.kind} takes"
    text = is_text_conditional(teacher)
    if text and config.data == "digits":
        raise RunError("data 'digits' has no captions for a text-conditional teacher: pass --data data-free with "
                       "--conditions FILE, or --data FOLDER of images with captions (name.png + name.txt)")
    if config.data == "digits":
        from pyevo.data import digits

        if channels != 1 or size[0] != size[1]:
            raise RunError(f"data 'digits' is grey square images but {what} {'x'.join(map(str, shape))}; "
                           "pass --data FOLDER or --data data-free")
        train, heldout = digits("train", size[0]), digits("heldout", size[0])
        labelled = [ImageSet(images, labels if conditional else None) for images, labels in (train, heldout)]
        _check_labels(labelled[0], classes, "the digits")
        return labelled[0], labelled[1], labelled[1], conditions
    if config.data == "data-free":
        # Inputs generated from the teacher's own sampling trajectories, for users without its data;
        # a class-conditional teacher is sampled at labels drawn uniformly over its classes.
        count = 4 * config.search.heldout_size
        labels = None
        if conditional:
            if classes is None:
                raise RunError("data-free needs the teacher's number of classes (num_class_embeds) to draw "
                               "labels; this teacher's class_embed_type has none: pass --data FOLDER")
            labels = uniform_labels(count, classes, torch.Generator().manual_seed(config.seed + 7919))
        # A text-conditional teacher is sampled at its prompts' states, each prompt as often as the others,
        # guided as the evaluation (and a Stable Diffusion pipeline) guides it.
        states, added = condition_rows(conditions, count), added_condition_rows(conditions, count)
        log.info("data-free: sampling %d %s from the teacher", count, "images" if codec is None else "latents")
        images = ddim_sample(teacher, scheduler.config, count, steps=25, seed=config.seed + 7919, progress=False,
                             class_labels=labels, clip_output=codec is None, encoder_hidden_states=states,
                             added_cond_kwargs=added, **guidance(conditions, config.guidance_scale))
        generated = ImageSet(images, labels, states, added)
        split = count - config.search.heldout_size
        return generated.subset(slice(0, split)), generated.subset(slice(split, None)), None, conditions
    from pyevo.data import ImageFolder, UnreadableImage

    folder = Path(config.data).expanduser()
    if not folder.is_dir():
        raise RunError(f"data folder not found: {folder}")
    if size[0] != size[1]:
        raise RunError(f"{what} {size[0]}x{size[1]} images; image folders are read as square images")
    try:
        dataset = ImageFolder(folder, size=size[0], channels=channels, labelled=conditional, captioned=text)
        data = ImageSet(*dataset.load(skip_unreadable=config.data_skip_bad))
    except UnreadableImage as error:
        raise RunError(f"{error}; remove it, or pass --data-skip-bad to leave unreadable files out") from None
    except ValueError as error:
        raise RunError(str(error)) from None
    if len(data) < 2:
        raise RunError(f"data folder {folder} holds {len(data)} image(s); pyevo needs at least 2")
    _check_labels(data, classes, f"data folder {folder}")
    if text:  # each image at its own caption's states
        conditions = caption_conditions(dataset.captions_of(dataset.read_paths), teacher,
                                        resolve_teacher_folder(config.teacher), folder)
        data = ImageSet(data.images, data.labels, conditions.states, conditions.added)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))
    held = max(1, min(config.search.heldout_size, len(data) // 10))
    return data.subset(order[held:]), data.subset(order[:held]), data, conditions


def training_sets(train: ImageSet, heldout: ImageSet, conditions: Conditions | None, guidance_scale: float
                  ) -> tuple[ImageSet, ImageSet]:
    """The sets distillation, the search and retraining use: as loaded, or, for a text-conditional
    teacher under guidance, every image at its own and at the unconditional states
    (:func:`pyevo.conditions.with_unconditional_rows`)."""
    if not guidance(conditions, guidance_scale):
        return train, heldout
    return tuple(with_unconditional_rows(data, conditions.negative, conditions.negative_added)
                 for data in (train, heldout))


def encode_images(codec: LatentCodec, sets: dict[str, ImageSet], posterior: str, seed: int, path: Path,
                  kept: Callable[..., torch.Tensor] | None = None) -> dict[str, ImageSet]:
    """Each set's latents (labels and text states kept), encoded once and written to ``path`` (safetensors).
    ``kept(name, encode)``: :meth:`Stages.kept_batches` of the encode stage, so that a killed encoding
    goes on from the batches it had encoded."""
    tensors = {}
    for index, (name, data) in enumerate(sets.items()):
        log.info("encoding %d %s images with the %s", len(data), name, codec.kind)

        def encode(done=(), on_batch=None, data=data, index=index):
            return codec.encode(data.images, posterior, seed + index, done=done, on_batch=on_batch)

        tensors[f"{name}.latents"] = (encode() if kept is None else kept(name, encode)).contiguous()
        if data.labels is not None:
            tensors[f"{name}.labels"] = data.labels.contiguous()
        if data.encoder_hidden_states is not None:
            tensors[f"{name}.encoder_hidden_states"] = data.encoder_hidden_states.contiguous()
        for key, value in (data.added_cond_kwargs or {}).items():
            tensors[f"{name}.added.{key}"] = value.contiguous()
    atomic_write_bytes(path, safetensors.torch.save(tensors))
    return _latent_sets(tensors, sets)


def read_latents(path: Path, names) -> dict[str, ImageSet]:
    """The sets :func:`encode_images` wrote to ``path``."""
    return _latent_sets(safetensors.torch.load_file(path), names)


def _latent_sets(tensors: dict[str, torch.Tensor], names) -> dict[str, ImageSet]:
    def added(name: str) -> dict[str, torch.Tensor] | None:
        prefix = f"{name}.added."
        return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)} or None

    return {name: ImageSet(tensors[f"{name}.latents"], tensors.get(f"{name}.labels"),
                           tensors.get(f"{name}.encoder_hidden_states"), added(name)) for name in names}


def _check_labels(data: ImageSet, classes: int | None, where: str) -> None:
    if data.labels is not None and classes is not None and int(data.labels.max()) >= classes:
        raise RunError(f"{where} has label {int(data.labels.max())}, outside the teacher's num_class_embeds "
                       f"({classes}: labels 0..{classes - 1})")


def timing_call(teacher, batch: int, seed: int, conditions: Conditions | None = None) -> dict[str, BlockCall]:
    """Every block's inputs at the deployment batch, for timing candidate blocks stand-alone (the
    cross-attention blocks of a text-conditional teacher attend to states of the conditions' length)."""
    generator = torch.Generator().manual_seed(seed)
    device = model_device(teacher)
    sample = torch.randn(batch, *sample_shape(teacher), generator=generator).to(device)
    timesteps = torch.full((batch,), 500, dtype=torch.long, device=device)
    states, added = condition_rows(conditions, batch), added_condition_rows(conditions, batch)
    return record_blocks(teacher, sample, timesteps, probe_labels(teacher, batch, device),
                         None if states is None else states.to(device),
                         None if added is None else {key: value.to(device) for key, value in added.items()})[0]


def recorded_timings(folder: Path, timings_for: dict, blocks: list[str]) -> dict | None:
    """The teacher timings the run in ``folder`` recorded (``timings.json``: the whole teacher's, its
    stem's and its blocks' milliseconds), where they are for this teacher, kind of device, dtype and batch;
    None where the teacher is to be timed now.

    A run from before timings.json has them too: each block's teacher-shaped candidate in its search
    carries the block's milliseconds, and its selection the teacher's and the stem's; those are marked
    ``legacy`` (the search's key then stays as it was).
    """
    path = folder / "timings.json"
    if path.is_file():
        try:
            data = read_json(path)
            good = (isinstance(data, dict) and isinstance(data.get("blocks_ms"), dict)
                    and set(data["blocks_ms"]) == set(blocks)
                    and all(isinstance(v, (int, float)) and v > 0 for v in
                            [data.get("teacher_ms"), data.get("stem_ms"), *data["blocks_ms"].values()]))
        except (OSError, ValueError):
            good = False
        if not good:
            log.warning("--resume: the recorded teacher timings %s are damaged: the teacher is timed again, and the "
                        "search, whose milliseconds they scale, runs again", path)
            return None
        if data.get("for") != timings_for:
            log.warning("--resume: the recorded teacher timings are for %s, this run is for %s: the teacher is timed "
                        "again", data.get("for"), timings_for)
            return None
        if data.get("device_name") not in (None, device_name(timings_for["device"])):  # None: a legacy run
            log.warning("--resume: the teacher was timed on %s, this is %s: the run goes on with the recorded "
                        "timings, so that its search's latencies stay on one scale", data.get("device_name"),
                        device_name(timings_for["device"]))
        log.info("teacher timings read back from %s (teacher %.3f ms)", path, data["teacher_ms"])
        return data
    import yaml

    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        searched, selected = read_json(folder / "search.json"), read_json(folder / "select.json")
        same = (torch.device(saved["device"]).type, saved["dtype"], saved["batch"]) == (
            timings_for["device"], timings_for["dtype"], timings_for["batch"])
        timings = {"for": timings_for, "legacy": True, "teacher_ms": float(selected["teacher_ms"]),
                   "stem_ms": float(selected["stem_ms"]),
                   "blocks_ms": {name: float(searched["blocks"][name]["teacher"]["latency_ms"]) for name in blocks}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, yaml.YAMLError):
        return None
    if not same:
        return None
    log.info("teacher timings read back from the run's search and selection (teacher %.3f ms)", timings["teacher_ms"])
    return timings


class BlockTimer:
    """Candidate blocks' latencies on the run's device, in milliseconds, through the persisted table.

    A candidate is timed in turn with its teacher-shaped block (:func:`pyevo.latency.time_calls`),
    and the table keeps the ratio of the two: a machine that drifts faster or slower between
    minutes leaves it alone. A run turns ratios into milliseconds with its own timings of the
    teacher's blocks (``reference_ms``), taken together with the whole teacher, so that candidate
    blocks, the teacher's stem and the teacher's latency all describe one machine state.
    """

    def __init__(self, config: RunConfig, teacher, supernet, spaces: dict[str, BlockSpace], table: LatencyTable,
                 conditions: Conditions | None = None):
        self.config, self.supernet, self.spaces, self.table = config, supernet, spaces, table
        self.calls = {name: call.to(config.device, DTYPES[config.dtype])
                      for name, call in timing_call(teacher, config.batch, config.seed, conditions).items()}
        self.reference_ms: dict[str, float] = {}
        self._teacher_blocks: dict[str, torch.nn.Module] = {}

    def __call__(self, name: str, genome) -> float:
        space = self.spaces[name]
        code = space.encode(genome)
        if code == space.encode(space.teacher_genome()):
            return self.reference_ms[name]
        return self.table.lookup(name, code, lambda: self.measure_ratio(name, genome)) * self.reference_ms[name]

    def measure_ratio(self, name: str, genome) -> float:
        """Time ``genome``'s static block and the teacher-shaped one in turn, now; their ratio."""
        cfg = self.config
        if name not in self._teacher_blocks:
            self._teacher_blocks[name] = self._static_block(name, self.spaces[name].teacher_genome())
        blocks = {"candidate": self._static_block(name, genome), "teacher": self._teacher_blocks[name]}
        call = self.calls[name]
        fns = {key: (lambda block=block: block(*call.args, **call.kwargs)) for key, block in blocks.items()}
        runtime = cfg.latency.runtime
        with timed_under(runtime, cfg.device, blocks.values()):
            times = time_calls(fns, cfg.device, cfg.latency.warmup, cfg.latency.repeats, cfg.latency.threads,
                               replays_graphs(runtime, cfg.latency.cuda_graph, cfg.device))
        return times["candidate"] / times["teacher"]

    def _static_block(self, name: str, genome) -> torch.nn.Module:
        return build_static_block(self.supernet[name], genome).to(self.config.device, DTYPES[self.config.dtype]).eval()


class BlockCoster:
    """MACs (batch 1) and parameters of stand-alone static blocks, cached by genome."""

    def __init__(self, teacher, seed: int, conditions: Conditions | None = None):
        self.calls = timing_call(teacher, 1, seed, conditions)
        self.cache: dict[tuple[str, str], Cost] = {}

    def __call__(self, name: str, super_block, space: BlockSpace, genome) -> Cost:
        key = (name, space.encode(genome))
        if key not in self.cache:
            block = build_static_block(super_block, genome).eval()
            call = self.calls[name]
            self.cache[key] = Cost(count_macs(block, *call.args, **call.kwargs), count_params(block))
        return self.cache[key]


# -------------------------------------------------------------------------------------- stages
class Stages:
    """Runs stages in order with resume-by-key and per-stage timing.

    A stage's result records the digests of the files it wrote (its *artifacts*); on resume a result
    whose JSON cannot be read, or whose artifacts are missing or differ from their digests, is not
    trusted: the stage runs again, and the log says why.
    """

    def __init__(self, folder: Path, resume: bool, context: distributed.Context = distributed.SINGLE):
        self.folder, self.resume, self.context = folder, resume, context
        self.key = ""
        self.seconds: dict[str, float] = {}

    def run(self, name: str, inputs: Any, compute: Callable[[], dict], result_file: str | None = None,
            artifacts: tuple[Path, ...] = (), where: str = "all", cleanup: tuple[Path, ...] = ()) -> dict:
        """``compute()`` returns a JSON-able dict; it is stored in ``<name>.json`` with its key.

        Under torchrun rank 0 decides whether the stage is done (and reads it back for every rank);
        otherwise ``compute()`` runs on every rank (``where="all"``: the data-parallel and spread-out
        stages) or on rank 0 alone (``"main"``), rank 0 writes the result, and every rank returns rank 0's.
        ``cleanup``: the stage's mid-stage checkpoints, removed once its result is written.
        """
        context = self.context
        self.key = hashlib.sha256(json.dumps([self.key, name, inputs], sort_keys=True, default=str)
                                  .encode()).hexdigest()[:16]
        path = self.folder / (result_file or f"{name}.json")

        def done() -> dict | None:
            if self.resume and path.is_file():
                stored = self._stored(name, path)
                if stored is not None and stored.get("key") == self.key:
                    log.info("stage %s: done already, read from %s", name, path)
                    return stored
            return None

        def remove_checkpoints() -> None:
            for path in cleanup:
                shutil.rmtree(path, ignore_errors=True)
                if path.parent.name == "checkpoints":  # the last stage's leaves no empty checkpoints/
                    with contextlib.suppress(OSError):
                        path.parent.rmdir()

        stored = context.on_main(done)
        if stored is not None:
            context.on_main(remove_checkpoints)  # a run killed between the result and the clean-up left them
            self.seconds[name] = stored["seconds"]
            return stored
        start = time.perf_counter()

        def finish(result: dict) -> dict:
            result.update(key=self.key, seconds=round(time.perf_counter() - start, 2),
                          artifacts=self._digests(artifacts))
            atomic_write_json(path, result)
            remove_checkpoints()
            return result

        if where == "main":
            result = context.on_main(lambda: finish(compute()))
        else:
            result = compute()
            result = context.on_main(lambda: finish(result))
        self.seconds[name] = result["seconds"]
        log.info("stage %s: %.1f s", name, result["seconds"])
        return result

    def checkpoints(self, name: str, every: int) -> StepCheckpoints:
        """The mid-stage checkpoints of the stage now running, ``name``, under its key."""
        return StepCheckpoints(self.folder / "checkpoints" / name, self.key, every, self.context)

    def kept_samples(self, name: str, draw: Callable[..., torch.Tensor]) -> torch.Tensor:
        """The evaluation's samples of one model, ``name``: :meth:`kept_batches` of the evaluate stage."""
        return self.kept_batches("evaluate", name, draw)

    def kept_batches(self, stage: str, name: str, draw: Callable[..., torch.Tensor]) -> torch.Tensor:
        """``draw(done, on_batch)`` (one tensor a stage makes batch by batch: a model's samples, a set's
        latents; :func:`pyevo.sample.ddim_sample`'s and :meth:`LatentCodec.encode`'s resume arguments), kept
        under the running stage's key in ``checkpoints/<stage>/``: read back whole when a killed run made it
        all already, else continued from the batches it had made (each kept as it is made, with its digest).
        Rank 0's (the encoding's and the evaluation's)."""
        where = self.folder / "checkpoints" / stage
        data, manifest = where / f"{name}.safetensors", where / f"{name}.json"
        if manifest.is_file():
            try:
                entry = read_json(manifest)
                if entry.get("key") == self.key and data.is_file() and file_digest(data) == entry.get("sha256"):
                    log.info("%s: the %s's batches read back from %s", stage, name, data)
                    return safetensors.torch.load_file(data)["samples"]
                if entry.get("key") == self.key:
                    log.warning("%s: %s is missing or damaged; the %s is made again", stage, data, name)
            except (ValueError, OSError, AttributeError, KeyError, safetensors.SafetensorError) as error:
                log.warning("%s: the kept batches %s are damaged (%s); the %s is made again",
                            stage, manifest, error, name)
        batches = where / f"{name}.batches"
        done = self._kept_batches(batches, stage, name)

        def keep(index: int, output: torch.Tensor) -> None:
            payload = safetensors.torch.save({"samples": output.contiguous()})
            atomic_write_bytes(batches / f"{index:05d}.safetensors", payload)
            atomic_write_json(batches / f"{index:05d}.json", {"key": self.key,
                                                              "sha256": hashlib.sha256(payload).hexdigest()})

        samples = draw(done, keep)
        payload = safetensors.torch.save({"samples": samples.contiguous()})
        atomic_write_bytes(data, payload)
        atomic_write_json(manifest, {"key": self.key, "sha256": hashlib.sha256(payload).hexdigest()})
        shutil.rmtree(batches, ignore_errors=True)
        return samples

    def _kept_batches(self, folder: Path, stage: str, name: str) -> list[torch.Tensor]:
        """The first batches a killed ``stage`` made of ``name`` under this key, in order, up to the first
        one missing or damaged."""
        done = []
        while True:
            data, manifest = folder / f"{len(done):05d}.safetensors", folder / f"{len(done):05d}.json"
            try:
                entry = read_json(manifest)
                if entry.get("key") != self.key or file_digest(data) != entry.get("sha256"):
                    break
                done.append(safetensors.torch.load_file(data)["samples"])
            except (ValueError, OSError, AttributeError, safetensors.SafetensorError):
                break
        if done:
            log.info("%s: %d batch(es) of the %s read back from %s", stage, len(done), name, folder)
        return done

    def _stored(self, name: str, path: Path) -> dict | None:
        try:
            stored = read_json(path)
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            log.warning("stage %s: %s is damaged; running the stage again", name, path)
            return None
        if not isinstance(stored, dict):
            return None
        recorded = stored.get("artifacts", {})
        current = self._digests(tuple(self.folder / relative for relative in recorded))
        for relative, digest in recorded.items():
            if current.get(relative) != digest:
                log.warning("stage %s: %s is missing or damaged; running the stage again", name, relative)
                return None
        return stored

    def _digests(self, artifacts: tuple[Path, ...]) -> dict[str, str]:
        files = []
        for artifact in artifacts:
            files += sorted(p for p in artifact.rglob("*") if p.is_file()) if artifact.is_dir() else [artifact]
        return {str(p.relative_to(self.folder)): file_digest(p) for p in files if p.is_file()}


def prepare(config: RunConfig, resume: bool, check_folder: bool = True):
    """Load and check everything a user can get wrong; create nothing yet (``check_folder``: the run
    folder too; under torchrun only rank 0, which writes it, checks it)."""
    config.validate()  # the device itself was checked by distributed.setup
    if check_folder:
        check_run_folder(config.out, resume)
    teacher, scheduler = load_teacher(config.teacher, config.scheduler or None)
    if config.evaluate.ddim_steps > scheduler.config.num_train_timesteps:  # DDIM steps are a subset of them
        raise ConfigError(f"evaluate.ddim_steps must be <= the teacher's {scheduler.config.num_train_timesteps} "
                          f"training timesteps, got {config.evaluate.ddim_steps}")
    codec = teacher_autoencoder(config.teacher, config.vae or None)
    if codec is not None:
        check_latent_teacher(codec, teacher)
        codec.vae.to(config.device)
        if scheduler.config.get("clip_sample", False):
            log.warning("the teacher's schedule clips samples to [-1, 1] (clip_sample: true), as a pixel "
                        "schedule does; latents are not bounded so, and sampling follows the schedule as it is")
    teacher.to(config.device)  # every stage runs on the run's device, data-free sampling included
    weights = config.evaluate.inception_weights
    if weights and not Path(weights).expanduser().is_file():
        raise RunError(f"evaluate.inception_weights: no file at {weights}")
    clip_folder = config.evaluate.clip_model
    if clip_folder and not is_text_conditional(teacher):
        raise RunError(f"evaluate.clip_model {clip_folder}: the CLIP score compares samples with their prompts, and "
                       f"the teacher ({type(teacher).__name__}) takes none")
    if clip_folder and not (Path(clip_folder).expanduser() / "config.json").is_file():
        raise RunError(f"evaluate.clip_model: {clip_folder} is not a model folder (no config.json); give a local "
                       "CLIP model (CLIPModel + CLIPProcessor saved with save_pretrained)")
    spaces = {space.name: space for space in unet_space(teacher)}
    # A caption folder brings its own conditions (its captions' states); otherwise --conditions does.
    captions = is_text_conditional(teacher) and config.data not in ("digits", "data-free")
    if captions and config.conditions:
        raise RunError(f"--conditions {config.conditions} with the caption folder {config.data}: the captions "
                       "condition a run on images; drop --conditions (or use --data data-free)")
    conditions = None if captions else load_conditions(config.conditions, teacher,
                                                       resolve_teacher_folder(config.teacher))
    warn_of_zero_guidance(conditions, config.guidance_scale)
    train, heldout, reference, conditions = load_images(config, teacher, scheduler, codec, conditions)
    if resume and check_folder:
        check_resume_config(Path(config.out).expanduser() / "config.yaml", config, is_text_conditional(teacher))
    return teacher, scheduler, codec, spaces, train, heldout, reference, conditions


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every key whose value differs."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append((prefix + key, old, new))
    return changes


# The stages in run order (the report follows them all); a config key re-runs the first stage that
# depends on it and, the keys being chained, every stage after it.
STAGE_ORDER = ("encode", "distill", "search", "select", "retrain", "evaluate")
# The search keys only the selection reads (changing them re-runs selection, not the search).
SELECTION_KEYS = ("rule", "slack", "budget", "max_macs", "max_params", "cap_latency_slack", "genome")
# Keys that change how often a stage checkpoints itself, not what it computes: in no stage's key.
CHECKPOINT_KEYS = ("checkpoint_every",)


def first_stage(key: str, config: RunConfig, text_conditional: bool = False) -> str | None:
    """The first stage whose result depends on the dotted config ``key`` (None: no stage's)."""
    section, _, name = key.partition(".")
    if key == "out" or section == "distributed" or name in CHECKPOINT_KEYS:
        return None  # where the run lives, how its processes wait, how often it checkpoints
    if section == "search":
        if name in SELECTION_KEYS:
            return "select"
        # An image folder's held-out split and a data-free run's sample count follow the held-out size,
        # so the training images do too; the digits' held-out set is fixed.
        return "distill" if name == "heldout_size" and config.data != "digits" else "search"
    if section == "latency":
        # The whole-network timings are the evaluation's (the run's teacher timings are recorded once).
        return "evaluate" if name == "network_repeats" else "search"
    if section in ("retrain", "evaluate"):
        return section
    if key in ("dtype", "batch"):  # the deployment settings latency is measured at
        return "search"
    if key == "guidance_scale" and not text_conditional:
        return None  # only text-conditional teachers are guided
    # The teacher, its schedule and autoencoder, the data, the conditions, the device, the training
    # dtype, the seed and distill.*: what the supernet is distilled from and how.
    return "distill"


def check_resume_config(saved_path: Path, config: RunConfig, text_conditional: bool = False) -> None:
    """On --resume, compare ``config`` with the run's saved one (before anything is written).

    A difference in a key the distillation (or the latents' encoding) depends on is refused, naming the
    keys: the run's trained supernet would no longer be this config's. A difference that only touches
    later stages (search, select, retrain, evaluate) is logged with the stages that run again; the
    stages before them are read back. Keys the saved config lacks (a run of an older pyevo) count as
    their defaults.
    """
    import yaml

    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
        if not isinstance(saved, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError):
        log.warning("--resume: the saved %s cannot be read; its stages are checked by their keys alone", saved_path)
        return
    current = config.to_dict()
    changes = [(key, old, new) for key, old, new in config_changes(_with_defaults(saved, RunConfig().to_dict()),
                                                                    current)
               if _has_key(current, key)]  # a key this pyevo no longer has changes nothing
    stages = {key: first_stage(key, config, text_conditional) for key, _, _ in changes}
    refused = [(key, old, new) for key, old, new in changes if stages[key] in ("encode", "distill")]
    if refused:
        named = ", ".join(f"{key} ({old!r} -> {new!r})" for key, old, new in refused)
        raise RunError(f"--resume: {named} differ from the run's saved config ({saved_path}), and its supernet was "
                       "distilled with the saved values: resume with those, or start a new run with another --out")
    for key, old, new in changes:
        if stages[key] is None:
            continue
        again = STAGE_ORDER[STAGE_ORDER.index(stages[key]):]
        log.warning("--resume: %s was %r, now %r: %s run again (and the report)", key, old, new,
                    ", ".join(stage for stage in again if stage != "encode"))


def _with_defaults(saved: dict, defaults: dict) -> dict:
    merged = dict(defaults)
    for key, value in saved.items():
        merged[key] = (_with_defaults(value, defaults[key]) if isinstance(value, dict)
                       and isinstance(defaults.get(key), dict) else value)
    return merged


def _has_key(config: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return False
        config = config[part]
    return True


# Keys added after runs were made with their defaults: a key holds them only where they are set, so
# that such a run resumes with its stages' keys as they were.
LATER_KEYS = {"teacher_path": False, "genome": ""}


def stage_config(section) -> dict:
    """A config section as a stage's key holds it: without how often the stage checkpoints itself (nor the
    later keys at their defaults)."""
    return {key: value for key, value in asdict(section).items()
            if key not in CHECKPOINT_KEYS and not (key in LATER_KEYS and value == LATER_KEYS[key])}


def check_run_folder(out: str, resume: bool) -> None:
    """The run folder can be written and holds what ``resume`` says: a run to continue, or nothing."""
    folder = Path(out).expanduser()
    used = folder.is_dir() and any(folder.iterdir())
    if resume and not used:
        raise RunError(f"--resume: there is no run in {folder} to continue (drop --resume to start one)")
    if used and not resume:
        raise RunError(f"run folder {folder} is not empty; pass --resume to continue that run "
                       "or choose another --out")
    if used and not (folder / "config.yaml").is_file():
        raise RunError(f"--resume: {folder} holds no pyevo run (no config.yaml)")
    if folder.exists() and not folder.is_dir():
        raise RunError(f"run folder {folder} is a file, not a folder")
    problem = folder_write_error(folder)  # the nearest existing folder decides whether --out can be created
    if problem is not None:
        raise RunError(f"cannot create or write the run folder {folder}: {problem}; choose another --out")


def run(config: RunConfig, resume: bool = False, progress: bool = True, until: str | None = None) -> dict | None:
    """The whole pipeline; returns the report (also written to ``<out>/report.json``). With
    ``until="retrain"`` it stops once the student is retrained and saved (``<out>/student``) and returns
    None: for callers that evaluate students their own way (``python -m pyevo.study``); ``until="select"``
    stops after the selection (a distilled and searched run that others resume from with other selections).

    Under torchrun (pyevo/distributed.py) every rank calls it: distillation and retraining are data
    parallel, the block searches are spread over the ranks, rank 0 alone writes the run folder and
    evaluates; the other ranks return None once the student is retrained.
    """
    context, config = distributed.setup(config)
    try:
        return _run(config, resume, progress and context.is_main, context, until)
    finally:
        context.close()


def _run(config: RunConfig, resume: bool, progress: bool, context: distributed.Context, until: str | None = None
         ) -> dict | None:
    if until not in (None, "select", "retrain"):
        raise ValueError(f"until must be None, 'select' or 'retrain', got {until!r}")
    main = context.is_main
    teacher, scheduler, codec, spaces, train, heldout, reference, conditions = context.agree(
        lambda: prepare(config, resume, check_folder=main))
    if context.active and config.data == "data-free":
        # Sampled by every rank on its own device: rank 0's samples are every rank's training and
        # held-out images (the same held-out set everywhere).
        train, heldout = context.broadcast_object((train, heldout))
    torch.manual_seed(config.seed)
    train_dtype = resolve_train_dtype(config.train_dtype, config.device)
    # Cross-attention blocks take as long as their text states are long: the table keeps them apart.
    teacher_id = fingerprint(dict(teacher.config) | ({} if conditions is None else
                                                     {"encoder_sequence_length": conditions.sequence_length}))
    table_path = config.latency.cache or str(Path(config.out) / "latency_table.json")
    # Keyed by this rank's own device: under torchrun each rank times its candidates where it runs, and
    # rank 0 saves them all (the other ranks write nothing, not even a probe of the cache's folder).
    setup = timing_setup(config.device, config.latency.threads, config.latency.runtime, config.latency.cuda_graph)
    table = LatencyTable(table_path, config.device, config.dtype, config.batch, teacher_id, setup=setup, writes=main)
    supernet = build_supernet(teacher)
    fixed_genomes = fixed_network_genome(config.search.genome, spaces)
    timer = BlockTimer(config, teacher, supernet, spaces, table, conditions)
    deployment_states = condition_rows(conditions, config.batch)
    deployment_added = added_condition_rows(conditions, config.batch)

    folder = Path(config.out)
    timings_for = {"teacher": teacher_id, "device": torch.device(config.device).type, "dtype": config.dtype,
                   "batch": config.batch, "setup": setup}

    def teacher_timings() -> dict:
        # The teacher and its blocks are timed in turn, so its stem (the network with its blocks replayed)
        # and the candidates' milliseconds (ratios to the teacher's blocks) describe one machine state.
        # A run times them once and records them (timings.json): a resumed run reads them back, so the
        # candidates its search still has to score are on the same scale as the ones scored before.
        recorded = recorded_timings(folder, timings_for, list(spaces)) if resume else None
        if recorded is not None:
            return recorded
        timed = network_latency({"teacher": teacher}, timer.calls, config.batch, config.dtype, config.device,
                                config.latency, deployment_states, deployment_added)["teacher"]
        return {"for": timings_for, "device_name": device_name(config.device), "teacher_ms": timed["latency_ms"],
                "stem_ms": timed["stem_ms"], "blocks_ms": timed["blocks_ms"]}

    def checks() -> dict:
        # The latency budget is checked before anything is written: the fastest genome of each block
        # (everything skipped) bounds what any selection can reach. Under torchrun rank 0 times the
        # teacher (or reads its recorded timings), and every rank's candidates are that many milliseconds
        # times their ratio.
        timings = teacher_timings()
        teacher_ms, timer.reference_ms, stem_ms = timings["teacher_ms"], dict(timings["blocks_ms"]), timings["stem_ms"]
        if config.search.rule in ("budget", "block-budget"):
            fastest = {n: timer(n, s.minimal_genome()) for n, s in spaces.items()}
            if config.search.rule == "budget":
                floor = stem_ms + sum(fastest.values())
                if floor > config.search.budget * teacher_ms:
                    raise BudgetError(f"budget {config.search.budget:g} x teacher ({config.search.budget * teacher_ms:.3f} ms) "
                                      f"is impossible: the fastest student takes {floor:.3f} ms "
                                      f"({floor / teacher_ms:.2f} x the teacher's {teacher_ms:.3f} ms)")
            else:
                for name, ms in fastest.items():
                    if ms > config.search.budget * timer.reference_ms[name]:
                        raise BudgetError(f"block budget {config.search.budget:g} is impossible for {name}: its fastest "
                                          f"genome takes {ms / timer.reference_ms[name]:.2f} x the teacher block")

        # The MACs and params caps likewise: the minimal genomes bound what any selection can reach.
        coster = BlockCoster(teacher, config.seed, conditions)
        teacher_cost = network_cost(teacher, conditions)
        teacher_blocks = {n: coster(n, supernet[n], s, s.teacher_genome()) for n, s in spaces.items()}
        stem_cost = teacher_cost - _sum_costs(teacher_blocks.values())
        cost_limit = Cost(config.search.max_macs * teacher_cost.macs, config.search.max_params * teacher_cost.params)
        floor_cost = stem_cost + _sum_costs(coster(n, supernet[n], s, s.minimal_genome()) for n, s in spaces.items())
        if floor_cost.macs > cost_limit.macs or floor_cost.params > cost_limit.params:
            raise BudgetError(f"caps max_macs {config.search.max_macs:g} / max_params {config.search.max_params:g} are "
                              f"impossible: the smallest student has {floor_cost.macs / teacher_cost.macs:.2f} x the "
                              f"teacher's MACs and {floor_cost.params / teacher_cost.params:.2f} x its params")
        if fixed_genomes is not None:  # a hand-picked genome is held to the caps as the rules' picks are
            fixed_cost = stem_cost + _sum_costs(coster(n, supernet[n], spaces[n], g) for n, g in fixed_genomes.items())
            if fixed_cost.macs > cost_limit.macs or fixed_cost.params > cost_limit.params:
                raise BudgetError(f"search.genome has {fixed_cost.macs / teacher_cost.macs:.3f} x the teacher's MACs "
                                  f"and {fixed_cost.params / teacher_cost.params:.3f} x its params, over the caps "
                                  f"max_macs {config.search.max_macs:g} / max_params {config.search.max_params:g}: "
                                  "raise them (1 = no cap)")
        return {"teacher_ms": teacher_ms, "reference_ms": timer.reference_ms, "stem_ms": stem_ms, "timings": timings,
                "coster": coster, "teacher_cost": teacher_cost, "stem_cost": stem_cost, "cost_limit": cost_limit,
                # The per-block searches go to ranks largest block first (the teacher block's MACs).
                "owners": distributed.assign_blocks({n: c.macs for n, c in teacher_blocks.items()},
                                                    context.world_size)}

    kept: dict[str, BlockCoster] = {}

    def main_checks() -> dict:
        checked = checks()
        kept["coster"] = checked.pop("coster")  # rank 0's, for the selection
        return checked

    checked = context.on_main(main_checks)
    timer.reference_ms = checked["reference_ms"]
    coster = kept.get("coster")
    teacher_ms, stem_ms, owners = checked["teacher_ms"], checked["stem_ms"], checked["owners"]
    teacher_cost, stem_cost, cost_limit = checked["teacher_cost"], checked["stem_cost"], checked["cost_limit"]

    def create() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # The config first: a run killed here leaves an empty folder or a resumable one (a resume that
        # finds no timings.json times the teacher again; no search has scored on the lost timings).
        save_config(config, folder / "config.yaml")
        atomic_write_json(folder / "timings.json", checked["timings"])
        table.save()

    context.on_main(create)  # rank 0 alone writes the run folder
    stages = Stages(folder, resume, context)

    # --- latents: a latent teacher trains, searches and retrains on the encoded images
    vae_digest = None if codec is None else tensor_digest(codec.vae.state_dict().values())
    if codec is not None and config.data != "data-free":
        latents_file = folder / "latents.safetensors"
        encoded: dict[str, ImageSet] = {}  # filled when the stage runs now; read back when it ran before

        def encode() -> dict:
            encoded.update(encode_images(codec, {"train": train, "heldout": heldout}, config.vae_posterior,
                                         config.seed, latents_file, partial(stages.kept_batches, "encode")))
            return {"vae": str(codec.folder), "kind": codec.kind, "scaling_factor": codec.scaling_factor,
                    "latent_std": float(encoded["train"].images.std())}

        # Rank 0 encodes (and writes) the latents; the other ranks receive them.
        stages.run("encode", [config.teacher, config.vae, config.data, config.vae_posterior, config.seed,
                              vae_digest, tensor_digest([t for part in (train, heldout) for t in part.tensors()])],
                   encode, artifacts=(latents_file,), where="main", cleanup=(folder / "checkpoints" / "encode",))
        latents = context.on_main(lambda: encoded or read_latents(latents_file, ("train", "heldout")))
        train, heldout = latents["train"], latents["heldout"]
    train, heldout = training_sets(train, heldout, conditions, config.guidance_scale)

    # --- distillation
    supernet_file = folder / "supernet.safetensors"

    def distill() -> dict:
        result = distill_supernet(teacher, supernet, spaces, train, scheduler, config.distill, config.seed, progress,
                                  train_dtype, context, stages.checkpoints("distill", config.distill.checkpoint_every))
        if main:
            atomic_write_bytes(supernet_file, safetensors.torch.save(
                {k: v.contiguous() for k, v in supernet.state_dict().items()}))
        return {"history": result.history}

    # The teacher's weights and the data themselves are in the key, not only their names: a teacher
    # retrained in place, or other images in the same folder, re-run what depends on them.
    data_digest = tensor_digest([t for part in (train, heldout) for t in part.tensors()])
    stages.run("distill", [stage_config(config.distill), config.teacher, config.scheduler, config.data, config.seed,
                           config.device, config.train_dtype, tensor_digest(teacher.state_dict().values()),
                           data_digest, {k: v for k, v in scheduler.config.items() if not k.startswith("_")}],
               distill, artifacts=(supernet_file,), cleanup=(folder / "checkpoints" / "distill",))
    if main:
        supernet.load_state_dict(safetensors.torch.load_file(supernet_file, device=str(model_device(teacher))))
    context.broadcast_module(supernet)  # rank 0's weights (trained alike, or read back) on every rank
    supernet.eval()

    # --- per-block local search
    def search() -> dict:
        # The same held-out set on every rank (same images, seed, timesteps and noise).
        calls = heldout_calls(teacher, heldout, scheduler, config.search.heldout_size, config.seed)
        results = {}
        for index, (name, space) in enumerate(spaces.items()):
            if owners[name] != context.rank:
                continue
            block = supernet[name]
            # On CUDA a generation's candidates are scored together through the population ops.
            def latency(genome, name=name):
                return timer(name, genome)

            evaluate = block_evaluator(block, calls[name], latency, config.device)

            # Generation checkpoints live under the stage's key: a changed search never resumes
            # from another search's generations. Under torchrun each rank writes its own blocks' ones
            # (a block has one owner, so no two ranks write one folder): a killed rank's blocks resume.
            # The block's cross-attentions project the held-out text states once for all its candidates.
            with block.sharing_text_projections():
                result = search_block(space, evaluate, config.search, config.seed * 1009 + index,
                                      folder / "search" / stages.key / name, progress)
            if main:
                table.save()
            results[name] = result.to_dict()
        return {"blocks": results}

    def search_ranks() -> dict:
        if not context.active:
            return search()
        parts = context.gather(lambda: (search()["blocks"], table.entries))
        if main:  # every rank's timings, each keyed by its own device
            for _, entries in parts:
                table.entries.update(entries)
            table.save()
        blocks = {name: block for part, _ in parts for name, block in part.items()}
        return {"blocks": {name: blocks[name] for name in spaces},
                "ranks": {name: owners[name] for name in spaces}}

    # The search does not depend on the selection's settings (changing them re-runs selection only),
    # nor on how often whole networks are timed. It depends on the teacher timings its milliseconds are
    # scaled by: timed again (a damaged timings.json), they re-run it, from its first generation.
    selection_keys = SELECTION_KEYS
    search_inputs = [{k: v for k, v in asdict(config.search).items() if k not in LATER_KEYS}
                     | dict.fromkeys(k for k in selection_keys if k not in LATER_KEYS),
                     asdict(config.latency) | {"network_repeats": None}, config.device, config.dtype, config.batch]
    if not checked["timings"].get("legacy"):  # a run from before timings.json keeps its search's key
        search_inputs.append({key: checked["timings"][key] for key in ("teacher_ms", "stem_ms", "blocks_ms")})
    searched = stages.run("search", search_inputs, search_ranks, cleanup=(folder / "search",))
    results = {name: BlockSearchResult.from_dict(data, spaces[name]) for name, data in searched["blocks"].items()}

    # --- selection (rank 0; the genomes go to every rank)
    def select() -> dict:
        rule, budget = config.search.rule, config.search.budget
        budget_ms = budget * teacher_ms - stem_ms

        def block_cost(name, candidate) -> Cost:
            return coster(name, supernet[name], spaces[name], candidate.genome)

        if fixed_genomes is not None:  # search.genome: the user's architecture (its caps checked up front)
            rule = "genome"
            picks = fixed_picks(fixed_genomes, results, supernet, timer, teacher, heldout, scheduler, config)
        elif rule == "global":
            picks = select_global(results, block_cost, stem_cost, cost_limit)
        else:
            if rule == "diffnas":
                picks = select_diffnas(results, config.search.slack)
            elif rule == "block-budget":
                picks = select_block_budget(results, budget)
            else:
                picks = select_budget(results, budget_ms)
            picks = meet_cost_caps(picks, results, block_cost, stem_cost, cost_limit,
                                   latency_guard(rule, results, budget, budget_ms), config.search.cap_latency_slack)
        genomes = {name: pick.genome for name, pick in picks.items()}
        estimate = stem_cost + _sum_costs(block_cost(n, p) for n, p in picks.items())
        return {"rule": rule, "genome": encode_network(genomes, list(spaces.values())),
                "blocks": {name: pick.to_dict() | asdict(block_cost(name, pick)) for name, pick in picks.items()},
                "teacher_ms": teacher_ms, "stem_ms": stem_ms,
                "latency_estimate_ms": stem_ms + sum(p.latency_ms for p in picks.values()),
                "macs_ratio": estimate.macs / teacher_cost.macs, "params_ratio": estimate.params / teacher_cost.params}

    selected = stages.run("select", [getattr(config.search, key) for key in selection_keys
                                     if key not in LATER_KEYS or getattr(config.search, key) != LATER_KEYS[key]],
                          select, where="main")
    genomes = {name: spaces[name].decode(item["genome"]) for name, item in selected["blocks"].items()}
    if until == "select":
        context.leave()
        return None

    # --- retraining
    student_folder = folder / "student"

    def retrain() -> dict:
        student = student_class(teacher).from_supernet(teacher, supernet, genomes).to(config.device)
        history = retrain_student(teacher, student, train, scheduler, config.retrain, config.seed, progress,
                                  train_dtype, context, stages.checkpoints("retrain", config.retrain.checkpoint_every))
        if main:
            _save_pretrained_atomic(student, student_folder)
        return {"history": history}

    stages.run("retrain", stage_config(config.retrain), retrain, artifacts=(student_folder,),
               cleanup=(folder / "checkpoints" / "retrain",))
    # Evaluation and the report are rank 0's, alone: every rank leaves the process group here.
    context.leave()
    if not main or until == "retrain":
        return None
    student = student_class(teacher).from_pretrained(student_folder, low_cpu_mem_usage=False).eval().to(config.device)

    # --- evaluation
    def evaluate() -> dict:
        return _evaluate(config, teacher, student, scheduler, codec, reference, train, timer.calls, folder,
                         progress, conditions, stages.kept_samples)

    reference_digest = None if reference is None else tensor_digest([reference.images])
    # The samples follow the conditions and their guidance (keyed only for a text-conditional teacher,
    # so other runs' evaluations keep their keys).
    text_inputs = [] if conditions is None else [conditions.digest(), config.guidance_scale]
    evaluated = stages.run("evaluate", [asdict(config.evaluate), asdict(config.latency), config.batch,
                                        config.dtype, config.device, config.vae, reference_digest, vae_digest,
                                        *text_inputs],
                           evaluate, artifacts=(folder / "samples.safetensors",),
                           cleanup=(folder / "checkpoints" / "evaluate",))

    from pyevo.report import write_report

    return write_report(folder, config, spaces, results, selected, evaluated, stages.seconds, teacher, student,
                        scheduler, codec, context, searched.get("ranks"))


def fixed_network_genome(text: str, spaces: dict[str, BlockSpace]) -> dict[str, tuple[int, ...]] | None:
    """``search.genome`` decoded in this teacher's space (None when it is empty), or a ConfigError."""
    if not text:
        return None
    try:
        return decode_network(text, list(spaces.values()))
    except ValueError as error:
        raise ConfigError(f"search.genome: {error}") from None


def fixed_picks(genomes: dict[str, tuple[int, ...]], results: dict[str, BlockSearchResult], supernet, timer,
                teacher, heldout: ImageSet, scheduler, config: RunConfig) -> dict[str, Candidate]:
    """Each block's candidate of a hand-picked genome: the search's own where it evaluated that genome,
    else scored now as the search scores (NSR on its held-out set, latency through the run's table)."""
    picks, calls = {}, None
    for name, genome in genomes.items():
        space = supernet[name].space
        code = space.encode(genome)
        found = [c for c in results[name].evaluated if c.code == code]
        if found:
            picks[name] = found[0]
            continue
        if calls is None:
            calls = heldout_calls(teacher, heldout, scheduler, config.search.heldout_size, config.seed)
        block = supernet[name]
        block.set_genome(genome)
        picks[name] = Candidate(genome, code, block_nsr(block, calls[name]), float(timer(name, genome)))
    return picks


def network_cost(unet, conditions: Conditions | None = None) -> Cost:
    """MACs of one batch-1 forward (a text-conditional UNet's at its conditions' length) and the
    parameters of a whole UNet."""
    device = model_device(unet)
    probe = torch.zeros(1, *sample_shape(unet), device=device)
    states, added = condition_rows(conditions, 1), added_condition_rows(conditions, 1)
    kwargs = conditioning(unet, probe_labels(unet, 1, device), None if states is None else states.to(device),
                          None if added is None else {key: value.to(device) for key, value in added.items()})
    return Cost(count_macs(unet, probe, torch.zeros(1, dtype=torch.long, device=device), **kwargs),
                count_params(unet))


def _sum_costs(costs) -> Cost:
    return sum(costs, Cost(0, 0))


def _evaluate(config, teacher, student, scheduler, codec: LatentCodec | None, reference: ImageSet | None,
              train: ImageSet, calls, folder: Path, progress: bool, conditions: Conditions | None = None,
              kept: Callable[[str, Callable[..., torch.Tensor]], torch.Tensor] = lambda name, draw: draw((), None)
              ) -> dict:
    # Same noise and, for a class-conditional teacher, the same labels (equal counts of every class
    # in the data), for a text-conditional one the same prompts' states (each equally often) and
    # guidance, for both models: the paired figures compare like with like.
    labels = None
    if is_class_conditional(teacher):
        labels = balanced_labels(config.evaluate.num_samples, torch.unique(train.labels))
    text = {"encoder_hidden_states": condition_rows(conditions, config.evaluate.num_samples),
            "added_cond_kwargs": added_condition_rows(conditions, config.evaluate.num_samples),
            **guidance(conditions, config.guidance_scale)} if conditions is not None else {}
    extractor, features_kind, features_note = quality_features(config.evaluate, image_shape(teacher, codec))
    samples = {}
    out = {}
    for name, model in (("teacher", teacher), ("student", student)):
        # A latent teacher's samples are decoded: every figure below is in image space.
        # Each model's samples are kept once drawn, batch by batch: a run killed in the evaluation reads them back.
        samples[name] = kept(name, lambda done, on_batch, model=model: sample_images(
            model, scheduler.config, config.evaluate.num_samples, config.evaluate.ddim_steps, config.seed, codec,
            progress=progress, class_labels=labels, done=done, on_batch=on_batch, **text))
        finite = torch.isfinite(samples[name].flatten(1)).all(dim=1)
        if not bool(finite.all()):
            raise NonFiniteError(f"evaluate: {int((~finite).sum())} of the {name}'s {len(finite)} samples are not "
                                 "finite" + (": the teacher cannot sample with this schedule" if name == "teacher"
                                             else ": retrain the student again (lower retrain.lr) with --resume"))
        out[name] = {**asdict(network_cost(model, conditions)),
                     **sample_quality(samples[name], None if reference is None else reference.images, extractor)}
    out["student"].update(paired_similarity(samples["student"], samples["teacher"]))
    out["clip"] = _clip_scores(config.evaluate.clip_model, samples, conditions, out)
    if labels is not None:
        out["student"]["per_class"] = per_class_similarity(samples["student"], samples["teacher"], labels)
    out["features"] = {"kind": features_kind, "note": features_note}
    # Teacher and student timed in turn, whole, block by block and stem alone: the per-block
    # estimate (the student's own stem plus its blocks) is checked against one machine state.
    timed = network_latency({"teacher": teacher, "student": student}, calls, config.batch, config.dtype,
                            config.device, config.latency, condition_rows(conditions, config.batch),
                            added_condition_rows(conditions, config.batch))
    for name, latency in timed.items():
        out[name].update(latency)
    out["student"]["latency_estimate_ms"] = timed["student"]["stem_ms"] + sum(timed["student"]["blocks_ms"].values())
    if codec is not None:
        # One decode per batch of images, beside the UNet's ddim_steps calls: what a user's
        # pipeline runs, so that the saving per image is stated with the decoder counted.
        out["decode_ms"] = decode_latency(codec, sample_shape(teacher), config.batch, config.dtype, config.device,
                                          config.latency)
    atomic_write_bytes(folder / "samples.safetensors", safetensors.torch.save(
        {name: images[:64].contiguous() for name, images in samples.items()}))
    return out


def _clip_scores(folder: str, samples: dict[str, torch.Tensor], conditions: Conditions | None, out: dict) -> dict:
    """Each model's CLIP score (``out[name]["clip_score"]``) against the prompts its samples were drawn
    at, where a CLIP model is given and the prompts are known; the model and a note."""
    if not folder:
        return {"model": None, "note": "no CLIP score (evaluate.clip_model not set)"}
    count = len(samples["teacher"])
    prompts = None if conditions is None else conditions.prompt_rows(count)
    if prompts is None:
        note = (f"no CLIP score: the conditions ({conditions.source if conditions else 'none'}) are states without "
                "their prompts; give a .txt file of prompts or a caption folder")
        log.warning(note)
        return {"model": folder, "note": note}
    try:
        clip = load_clip_model(folder)
    except ClipUnavailable as error:
        raise RunError(f"evaluate.clip_model: {error}") from None
    for name, images in samples.items():
        out[name]["clip_score"] = clip_score(images, prompts, clip)
    return {"model": folder, "note": f"CLIP score in {folder}, {count} samples at their prompts"}


def _save_pretrained_atomic(model, folder: Path) -> None:
    """save_pretrained into a temporary folder beside ``folder``, then swap it in."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(tmp)
        # The user's usual modes, not mkdtemp's 0700 (nor the 0600 of the weights' temporary file).
        mask = user_umask()
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
