"""Quality check of the digits teacher (run as ``python -m pyevo.teachers.digits --evaluate``).

The bar: 1,000 DDIM samples (50 steps, eta 0, seed 0) must have a Fréchet distance to the
held-out digits of at most 1.5x the real-vs-real floor (1,000 training images drawn with a fixed
seed vs the same held-out set), and every class must hold 5%-15% of the samples. With ``bar:
balanced`` the FD on each side is of a class-balanced subset (``balanced_per_class`` images of each
class, by the classifier's labels for samples): the FD without the class mixture, which otherwise
dominates this 64-d feature space (the latent-digits teacher's bar).
"""
from __future__ import annotations

import datetime
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from pyevo.classifier import accuracy, load_digits_classifier
from pyevo.data import DIGITS_SIZE, at_digits_size, digits
from pyevo.metrics import class_coverage, class_mixture_distance, frechet_distance
from pyevo.sample import ddim_sample
from pyevo.teacher import load_teacher

log = logging.getLogger(__name__)

NOTES_HEADING = "## Notes"


@dataclass
class TeacherEvalConfig:
    n_samples: int = 1000
    steps: int = 50
    seed: int = 0
    floor_seed: int = 0
    max_fd_ratio: float = 1.5
    min_class_share: float = 0.05
    max_class_share: float = 0.15
    reference_draws: int = 16  # i.i.d. reference draws
    balanced_per_class: int = 70  # class-balanced FD: images per class
    bar: str = "fd"  # which FD ratio the bar applies to: "fd" (all samples) or "balanced"

    def __post_init__(self) -> None:
        if self.bar not in ("fd", "balanced"):
            raise ValueError(f"bar must be 'fd' or 'balanced', got {self.bar!r}")


@dataclass
class TeacherEvalResult:
    fd_samples: float
    fd_floor: float
    fd_ratio: float
    class_shares: list[float]
    classifier_heldout_accuracy: float
    fd_iid_reference: list[float]  # one per draw, sorted
    fd_balanced_samples: float
    fd_balanced_train: float
    class_mixture_tv: float  # total-variation distance of the samples' class mixture to the held-out one
    sample_seconds: float
    total_seconds: float
    passed: bool


def evaluate_teacher(folder: str | Path, cfg: TeacherEvalConfig = TeacherEvalConfig()) -> TeacherEvalResult:
    start = time.perf_counter()
    unet, scheduler = load_teacher(str(folder))
    sample_start = time.perf_counter()
    samples = ddim_sample(unet, scheduler.config, cfg.n_samples, steps=cfg.steps, seed=cfg.seed)
    return evaluate_samples(samples, time.perf_counter() - sample_start, cfg, start=start)


def evaluate_samples(samples: torch.Tensor, sample_seconds: float, cfg: TeacherEvalConfig = TeacherEvalConfig(),
                     image_size: int = DIGITS_SIZE, start: float | None = None) -> TeacherEvalResult:
    """The quality check of a teacher's digit samples (N, 1, S, S), against the digits drawn at
    ``image_size`` (the teacher's own size; the feature space resizes both to 16x16), so pixel and
    latent teachers are judged alike. ``start``: when the evaluation began (for total_seconds)."""
    start = time.perf_counter() if start is None else start
    classifier = load_digits_classifier()
    train_images, train_labels = digits("train", size=image_size)
    heldout_images, heldout_labels = digits("heldout", size=image_size)

    if cfg.n_samples > len(train_images):
        raise ValueError(f"n_samples {cfg.n_samples} exceeds the {len(train_images)} training images the floor draws from")
    floor_draw = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(cfg.floor_seed))
    fd_floor = frechet_distance(train_images[floor_draw[:cfg.n_samples]], heldout_images, classifier)

    fd_samples = frechet_distance(samples, heldout_images, classifier)
    shares = class_coverage(samples, classifier)
    iid = sorted(frechet_distance(draw, heldout_images, classifier)
                 for draw in iid_reference_draws(train_images, train_labels, heldout_labels, cfg))
    sample_labels = classifier.predict(at_digits_size(samples))
    fd_balanced_samples = frechet_distance(
        samples[balanced_index(sample_labels, cfg.balanced_per_class, cfg.seed)], heldout_images, classifier)
    fd_balanced_train = frechet_distance(
        train_images[balanced_index(train_labels, cfg.balanced_per_class, cfg.floor_seed)], heldout_images, classifier)
    ratio = fd_samples / fd_floor
    bar_ratio = ratio if cfg.bar == "fd" else fd_balanced_samples / fd_balanced_train
    passed = bar_ratio <= cfg.max_fd_ratio and all(cfg.min_class_share <= s <= cfg.max_class_share for s in shares)
    return TeacherEvalResult(
        fd_samples=fd_samples,
        fd_floor=fd_floor,
        fd_ratio=ratio,
        class_shares=shares,
        classifier_heldout_accuracy=accuracy(classifier, at_digits_size(heldout_images), heldout_labels),
        fd_iid_reference=iid,
        fd_balanced_samples=fd_balanced_samples,
        fd_balanced_train=fd_balanced_train,
        class_mixture_tv=class_mixture_distance(samples, heldout_labels, classifier),
        sample_seconds=sample_seconds,
        total_seconds=time.perf_counter() - start,
        passed=passed,
    )


def iid_reference_draws(train_images: torch.Tensor, train_labels: torch.Tensor, heldout_labels: torch.Tensor,
                        cfg: TeacherEvalConfig):
    """``cfg.reference_draws`` sets of ``cfg.n_samples`` training images with multinomial class counts."""
    shares = torch.bincount(heldout_labels, minlength=10).double()
    gen = torch.Generator().manual_seed(cfg.floor_seed + 1)
    by_class = [torch.nonzero(train_labels == k).flatten() for k in range(len(shares))]
    for _ in range(cfg.reference_draws):
        counts = torch.bincount(torch.multinomial(shares, cfg.n_samples, replacement=True, generator=gen),
                                minlength=len(shares))
        picks = []
        for members, count in zip(by_class, counts.tolist()):
            if count > len(members):
                raise ValueError(f"an i.i.d. draw needs {count} training images of one class, "
                                 f"which has only {len(members)}; lower n_samples")
            picks.append(members[torch.randperm(len(members), generator=gen)[:count]])
        yield train_images[torch.cat(picks)]


def balanced_index(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """``per_class`` indices of each label (fewer where a class has fewer), in a seeded order."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for k in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == k).flatten()
        picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(picks)


def format_table(result: TeacherEvalResult, cfg: TeacherEvalConfig, extra_rows: Sequence[tuple[str, str]] = ()) -> str:
    """The results table; ``extra_rows`` (metric, value) go just before the verdict."""
    rows = [
        ("FD samples vs held-out", f"{result.fd_samples:.3f}"),
        ("FD floor (train draw vs held-out)", f"{result.fd_floor:.3f}"),
        ("ratio" + (" (bar <= %.2f)" % cfg.max_fd_ratio if cfg.bar == "fd" else ""), f"{result.fd_ratio:.3f}"),
        ("class shares 0..9 (bar %.0f%%-%.0f%%)" % (100 * cfg.min_class_share, 100 * cfg.max_class_share),
         " ".join(f"{100 * s:.1f}" for s in result.class_shares)),
        (f"i.i.d. reference FD, {len(result.fd_iid_reference)} draws: median (min-max)",
         f"{statistics.median(result.fd_iid_reference):.3f} ({result.fd_iid_reference[0]:.3f}-{result.fd_iid_reference[-1]:.3f})"),
        ("i.i.d. reference: median ratio to the floor; share of draws within the bar",
         f"{statistics.median(result.fd_iid_reference) / result.fd_floor:.3f}; "
         f"{sum(fd <= cfg.max_fd_ratio * result.fd_floor for fd in result.fd_iid_reference)}/{len(result.fd_iid_reference)}"),
        (f"class-balanced FD ({cfg.balanced_per_class} per class): samples / training images",
         f"{result.fd_balanced_samples:.3f} / {result.fd_balanced_train:.3f}"),
        ("class-balanced ratio" + (" (bar <= %.2f)" % cfg.max_fd_ratio if cfg.bar == "balanced" else ""),
         f"{result.fd_balanced_samples / result.fd_balanced_train:.3f}"),
        ("class mixture: total-variation distance to the held-out mixture", f"{result.class_mixture_tv:.3f}"),
        ("classifier held-out accuracy", f"{100 * result.classifier_heldout_accuracy:.2f}%"),
        (f"sampling seconds ({cfg.n_samples} x {cfg.steps} DDIM steps)", f"{result.sample_seconds:.1f}"),
        ("evaluation seconds", f"{result.total_seconds:.1f}"),
        *extra_rows,
        ("bar met", "yes" if result.passed else "NO"),
    ]
    lines = ["| metric | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


DIGITS_COMMANDS = (
    "python -m pyevo.classifier             # digits classifier (feature extractor)",
    "python -m pyevo.teachers.digits        # train the teacher -> pyevo/assets/digits_teacher/",
    "python -m pyevo.teachers.digits --evaluate",
)


def write_report(path: Path, folder: Path, result: TeacherEvalResult, cfg: TeacherEvalConfig, *,
                 title: str = "Digits teacher: quality check", commands: Sequence[str] = DIGITS_COMMANDS,
                 training: Sequence[str] | None = None, evaluation: str | None = None,
                 extra_rows: Sequence[tuple[str, str]] = (), extra_raw: dict | None = None) -> None:
    """Write the markdown results page (atomically), with the training facts the teacher folder records.

    The defaults write the pixel digits teacher's page; another built-in teacher (latent-digits)
    passes its own title, commands, training lines, evaluation sentence, extra table rows and raw
    figures, so both pages keep one shape.
    """
    info_path = folder / "training_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    train_cfg = info.get("config", {})
    last_loss = info.get("loss_history", [{}])[-1].get("loss") if info.get("loss_history") else None
    shown = {k: v for k, v in train_cfg.items() if k not in ("out", "checkpoint_every", "checkpoint_dir", "log_every")}
    training_lines = [
        "- " + ", ".join(f"{k} {v}" for k, v in shown.items()),
        f"- wall time {info.get('seconds')} s on the shared 2-core development CPU; "
        f"final mean loss {last_loss if last_loss is None else round(last_loss, 4)}; torch {info.get('torch')}",
    ] if info else ["- (no training_info.json in the teacher folder)"]
    if training is not None:
        training_lines = list(training)
    if evaluation is None:
        evaluation = (
            f"Evaluation: {cfg.n_samples} DDIM samples ({cfg.steps} steps, eta 0, seed {cfg.seed}) vs the 500 "
            f"held-out digits, in the digits classifier's 64-d feature space (float64). The floor is "
            f"{cfg.n_samples} training images (draw seed {cfg.floor_seed}) vs the same held-out set.")
    text = "\n".join([
        f"# {title}",
        "",
        f"Date: {datetime.date.today().isoformat()}",
        "",
        "Commands:",
        "",
        "```",
        *commands,
        "```",
        "",
        f"Teacher: `{folder.name}`",
        "",
        "Training:",
        "",
        *training_lines,
        "",
        evaluation,
        "",
        format_table(result, cfg, extra_rows),
        "",
        "Raw:",
        "",
        "```json",
        json.dumps({"config": asdict(cfg), "result": asdict(result), **(extra_raw or {})}, indent=2),
        "```",
        "",
    ])
    # A hand-written "## Notes" section of an existing page survives re-evaluation.
    if path.is_file() and NOTES_HEADING in path.read_text():
        text += "\n" + NOTES_HEADING + path.read_text().split(NOTES_HEADING, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def evaluate_cli(folder: str, report: str | None, num_threads: int) -> None:
    torch.set_num_threads(num_threads)
    cfg = TeacherEvalConfig()
    try:
        result = evaluate_teacher(folder, cfg)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print(format_table(result, cfg))
    if report:
        write_report(Path(report), Path(folder), result, cfg)
        log.info("wrote %s", report)
    if not result.passed:
        raise SystemExit("error: the teacher does not meet the quality bar")
