"""The study's results page (markdown) and plots, written from whatever units have finished.

Every quality figure is a mean ± std over the evaluation noise seeds, and each model/teacher ratio is a
ratio of the means. Verdicts compare two arms on a figure: *better* or *worse* where the means differ by
more than the two standard deviations combined (sqrt(s1² + s2²)), *within noise* otherwise.
"""
from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pyevo.autoencoder import has_own_autoencoder
from pyevo.runfolder import atomic_write_text
from pyevo.study.plan import Arm, default_end_target, target_name
from pyevo.study.quality import BALANCED_PER_CLASS, FIGURES, LOWER_IS_BETTER, summarise
from pyevo.study.units import StudyContext

FIGURE_NAMES = {"fd": "FD", "kid": "KID", "balanced_fd": "class-balanced FD", "mixture_tv": "class-mixture TV",
                "psnr": "PSNR vs teacher (dB)", "ssim": "SSIM vs teacher", "agreement": "same class as teacher"}
FAMILY_MARKERS = {"pyevo": "o", "ablation": "s", "random": "x", "bk-sdm": "D", "uniform": "^", "diff-pruning": "v"}


def finished_units(context: StudyContext) -> dict[str, dict]:
    """Every finished unit's stored record (its current key's), by unit name, read once per page."""
    records = {name: context.stored(name) for name in context.units}
    return {name: record for name, record in records.items() if record is not None}


@dataclass(frozen=True)
class TrainingSeedSpread:
    """A family's arms at one target over its training seeds: per figure the mean of the seeds' means and the
    std of those means (``summary``, shaped as one arm's), their mean MACs ratio, and how many seeds."""

    summary: dict
    macs: float
    seeds: int


def collect(finished: dict[str, dict], arms: list[Arm]) -> tuple[dict | None, dict[str, dict]]:
    """The teacher's result and, per arm, what has finished of it (made, quality summary, latency), from the
    finished units' records (:func:`finished_units`)."""
    teacher = finished.get("teacher")
    teacher_seeds = teacher["result"]["per_seed"] if teacher else None
    rows = {}
    for arm in arms:
        made, latency = finished.get(arm.name), finished.get(f"latency-{arm.name}")
        rows[arm.name] = {"arm": arm, "made": made and made["result"], "made_seconds": made and made["seconds"],
                          "quality": made and made["result"],
                          "summary": summarise(made["result"]["per_seed"], teacher_seeds) if made else None,
                          "latency": latency and latency["result"]}
    return teacher, rows


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _figure(row: dict, figure: str, digits: int = 2) -> str:
    summary = row["summary"]
    if not summary:
        return "pending"
    if figure not in summary:
        return "—"
    entry = summary[figure]
    text = f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"
    return text + (f" ({entry['ratio']:.3f}x)" if entry["ratio"] is not None else "")


def verdict(a: dict | None, b: dict | None, figure: str) -> str:
    """How arm ``a`` compares with arm ``b`` on ``figure`` (their summaries)."""
    if not a or not b or figure not in a or figure not in b:
        return "pending"
    difference = a[figure]["mean"] - b[figure]["mean"]
    noise = math.hypot(a[figure]["std"], b[figure]["std"])
    if abs(difference) <= noise:
        return "within noise"
    return "better" if (difference < 0) == LOWER_IS_BETTER[figure] else "worse"


def with_training_noise(summary: dict | None, spread: TrainingSeedSpread | None) -> dict | None:
    """``summary`` with each figure's std widened by ``spread``'s (a family's std over training seeds): what a
    single training seed's model could move by, so that two such models' verdict counts it for each."""
    if not summary or not spread:
        return None
    return {figure: {**entry, "std": math.hypot(entry["std"], spread.summary[figure]["std"])}
            for figure, entry in summary.items() if figure in spread.summary}


def write_results(path: Path, context: StudyContext, arms: list[Arm], command: str) -> None:
    finished = finished_units(context)
    teacher, rows = collect(finished, arms)
    # pyevo's own spread over training seeds at the main target: what a single seed's verdict hides.
    spread = over_training_seeds(rows, "pyevo", context.settings.main_target)
    plots = path.parent / f"{path.stem.lower()}_plots"  # RESULTS.md's beside it in results_plots/
    lines = [f"# Evidence study ({context.settings.name}): pyevo against the simple alternatives on the "
             f"`{context.settings.teacher}` teacher", "",
             "Written by `" + command + "` (regenerated after every finished unit; rows not yet run say *pending*).",
             "", *_setup_lines(context, finished), ""]
    lines += _teacher_lines(teacher)
    lines += _main_table(context, rows)
    lines += _seed_table(context, rows, spread)
    lines += _ablation_lines(context, rows, spread)
    lines += _verdict_lines(context, rows, spread)
    lines += _equal_macs_lines(rows)
    lines += _equal_latency_lines(rows)
    drawn = _plots(plots, teacher, rows)
    if drawn:
        lines += ["## Plots", ""] + [f"![{title}]({plots.name}/{file})" for title, file in drawn] + [""]
    lines += _time_lines(context, finished)
    atomic_write_text(path, "\n".join(lines) + "\n")


def balanced_shortfall(finished: dict[str, dict], num_samples: int) -> tuple[int, int, int | None]:
    """How many finished sample sets (model and seed; ``num_samples`` each) hold fewer than
    ``BALANCED_PER_CLASS`` of some predicted class, of how many, and the fewest of a class among them (None
    where none is short)."""
    short, sets, fewest = 0, 0, None
    for result in finished.values():
        for figures in (result.get("result") or {}).get("per_seed", {}).values():
            shares = figures.get("class_shares")
            if not shares:
                continue
            sets += 1
            least = round(min(shares) * num_samples)
            if least < BALANCED_PER_CLASS:
                short += 1
                fewest = least if fewest is None else min(fewest, least)
    return short, sets, fewest


def _setup_lines(context: StudyContext, finished: dict[str, dict]) -> list[str]:
    s = context.settings
    latent = has_own_autoencoder(s.teacher)  # figures on decoded samples
    timed = ("UNet forward (the decoder, the same for every model and run once per sample, left out)" if latent
             else "whole forward")
    versions = []
    for package in ("torch", "diffusers", "deap", "torch-pruning", "torchmetrics"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    short, sets, fewest = balanced_shortfall(finished, s.num_samples)
    return [f"- Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {len(finished)} of "
            f"{len(context.units)} units finished. Machine: {cpu}, {len(_cores())} core(s); Python "
            f"{platform.python_version()}; {', '.join(versions)}.",
            f"- Targets (MACs, fraction of the teacher's): {', '.join(target_name(t) + '%' for t in s.targets)}; "
            f"evaluation noise seeds {list(s.eval_seeds)} ({s.num_samples} DDIM samples of {s.ddim_steps} steps "
            f"per model and seed, the teacher's from the same noise); training seeds {list(s.training_seeds)} at "
            f"{target_name(s.main_target)}%.",
            "- Quality is in the digits classifier's features against the 500 held-out digits"
            + (" (a latent model's samples decoded by the teacher's autoencoder, as its pipeline decodes them)"
               if latent else "") + f". Class-balanced FD: {BALANCED_PER_CLASS} samples of each predicted class (the "
            "class mixture drops out; all of a class where a set holds fewer"
            + (f": {short} of the {sets} sample sets so far, at fewest {fewest}" if short else "") + "); class-mixture "
            "TV: total-variation "
            "distance of the predicted class shares to the held-out ones. Ratios (in brackets) are the model's "
            "mean over the teacher's mean (KID's only where both means stand clear of their spread over the "
            "seeds: the unbiased KID of a near-perfect set is noise around zero). PSNR, SSIM and same class are "
            "paired with the teacher's samples.",
            "- Verdicts (*better*, *worse*, *within noise*) compare two arms' means over the evaluation seeds: "
            "*within noise* where they differ by no more than the root sum of squares of their stds; the random "
            "genomes of a target pool to the mean and std of their means.",
            "- Every in-space arm (pyevo, random genomes, BK-SDM removal, ablations) is retrained from the "
            "distilled supernet with pyevo's retraining (dynamic joint loss unless the ablation says otherwise). "
            "The pruned arms (uniform width, Diff-Pruning) change block widths, so no block-wise term applies: "
            "they retrain with the end loss alone, same steps, batch, learning rate, schedule and EMA. Caps on "
            "params are off everywhere (targets are MACs). A pruned arm reaches only the MACs its channel "
            "granularity allows (every layer keeps the same share of each of its channel groups): it is pruned "
            "to the achievable ratio nearest its target, which can lie above it; the MACs column says where "
            "each arm landed, and the plots place every arm at its own MACs and latency.",
            f"- Latency: each model's {timed} beside the teacher's, timed in turn, batch {s.latency_batch}, "
            f"float32, CPU, median of {s.latency_repeats}, with nothing else of the study running.",
            *_build_lines(finished), *_code_lines(finished)]


def _code_lines(finished: dict[str, dict]) -> list[str]:
    """Which code made each finished unit: the last commit that changed the code at or before the one each
    result names (the units' keys hold their settings, not the code)."""
    from pyevo.study.provenance import code_commit

    recorded: dict[str, int] = {}  # as the results name it, so git is asked once per distinct version
    for result in finished.values():
        version = result.get("code") or "not recorded"
        recorded[version] = recorded.get(version, 0) + 1
    made: dict[str, int] = {}
    for version, count in recorded.items():
        commit = version if version == "not recorded" else code_commit(version)
        made[commit] = made.get(commit, 0) + count
    if not made:
        return []
    counts = [f"`{version}`: {count}" if version != "not recorded"
              else f"not recorded (made before results named their commit): {count}" for version, count in made.items()]
    return ["- Code each unit ran at (the last commit that changed pyevo's code; units): " + ", ".join(counts) + "."]


def _build_lines(finished: dict[str, dict]) -> list[str]:
    """Which build of the base (distillation and search) each finished in-space arm came from: the work
    folder is not kept between sittings, so each sitting distils and searches again, and builds on other
    machines can differ in float rounding."""
    builds: dict[str, list[str]] = {}
    for name, result in finished.items():
        digest = result["result"].get("base_search_sha256")
        if digest:
            builds.setdefault(digest, []).append(name)
    if len(builds) < 2:
        return []
    parts = "; ".join(f"`{digest[:8]}` ({', '.join(names)})" for digest, names in builds.items())
    return [f"- The in-space arms so far come from {len(builds)} builds of the base (distillation and search, "
            f"one per sitting; search.json sha256 and the arms from each): {parts}."]


def _cores() -> list[int]:
    import os

    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _teacher_lines(teacher: dict | None) -> list[str]:
    lines = ["## The teacher's quality bar", ""]
    if teacher is None:
        return lines + ["pending", ""]
    bar = teacher["result"]["bar"]
    lines += ["The bar: class-balanced FD at most 1.5x the real-vs-real class-balanced floor (training digits "
              "against the held-out ones), every class share within 5–15%; the FD against an i.i.d. draw of "
              "training digits beside it.", "",
              "| seed | class-balanced FD | floor | ratio | FD | FD floor | FD of i.i.d. draws (min–max) "
              "| class shares (min–max) | passes |", "|---|---|---|---|---|---|---|---|---|"]
    for seed, b in bar.items():
        iid = b["fd_iid_reference"]
        lines.append(f"| {seed} | {b['balanced_fd']:.2f} | {b['balanced_floor']:.2f} | {b['balanced_ratio']:.3f} | "
                     f"{b['fd']:.2f} | {b['fd_floor']:.2f} | {min(iid):.2f}–{max(iid):.2f} | "
                     f"{min(b['class_shares']):.3f}–{max(b['class_shares']):.3f} | {'yes' if b['passed'] else 'no'} |")
    ratios = [b["balanced_ratio"] for b in bar.values()]
    mean = statistics.mean(ratios)
    passes = mean <= 1.5 and all(0.05 <= share <= 0.15 for b in bar.values() for share in b["class_shares"])
    over = [f"{seed} ({b['balanced_ratio']:.3f})" for seed, b in bar.items() if b["balanced_ratio"] > 1.5]
    lines += ["", f"Mean class-balanced ratio {mean:.3f}" + (f" ± {statistics.stdev(ratios):.3f}" if len(ratios) > 1
                                                             else "") +
              f": the teacher {'meets' if passes else 'does not meet'} the bar over these seeds (the ratio judged on "
              "its mean over them, every class share at every seed)"
              + (f"; alone, seed {', '.join(over)} is over 1.5" if over else "") + ".", ""]
    return lines


def _main_table(context: StudyContext, rows: dict[str, dict]) -> list[str]:
    lines = ["## Every arm", "",
             "| arm | target | seed | MACs | params | CPU latency (model / teacher ms) | FD | class-balanced FD | KID "
             "| class-mixture TV | PSNR vs teacher | SSIM | same class |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows.values():
        arm, made, quality, latency = row["arm"], row["made"], row["quality"], row["latency"]
        macs = (quality or made or {}).get("macs_ratio")
        params = (quality or made or {}).get("params_ratio")
        lat = "pending" if latency is None else (f"{latency['ratio']:.3f} ({latency['model_ms']:.1f} / "
                                                 f"{latency['teacher_ms']:.1f})")
        name = arm.label + (f" `{arm.name}`" if arm.family == "random" else "")
        lines.append(f"| {name} | {'—' if arm.target is None else target_name(arm.target) + '%'} | "
                     f"{arm.training_seed} | {_fmt(macs)} | {_fmt(params)} | {lat} | {_figure(row, 'fd')} | "
                     f"{_figure(row, 'balanced_fd')} | {_figure(row, 'kid', 1)} | {_figure(row, 'mixture_tv', 3)} | "
                     f"{_figure(row, 'psnr')} | {_figure(row, 'ssim', 3)} | {_figure(row, 'agreement', 3)} |")
    lines.append("")
    for group in same_students(rows):
        labels = [f"{rows[n]['arm'].label} ({_target_text(rows[n]['arm'])})" for n in group]
        lines += [f"- {' and '.join(labels)} are one student: the same genome from the same search, retrained "
                  "alike (every figure identical).", ""]
    return lines


def _target_text(arm: Arm) -> str:
    return "no target" if arm.target is None else f"{target_name(arm.target)}%"


def same_students(rows: dict[str, dict]) -> list[list[str]]:
    """Groups of in-space arms that are one model: the same genome from the same search with bit-identical
    figures at every evaluation seed (a cap that does not bind selects what the uncapped rule selects)."""
    groups: dict[str, list[str]] = {}
    for name, row in rows.items():
        made = row["made"]
        if made and made.get("genome"):
            fingerprint = json.dumps([made["genome"], made.get("base_search_sha256"), made["per_seed"]],
                                     sort_keys=True)
            groups.setdefault(fingerprint, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _seed_table(context: StudyContext, rows: dict[str, dict], spread: TrainingSeedSpread | None) -> list[str]:
    main = context.settings.main_target
    if len(context.settings.training_seeds) < 2:
        return []
    lines = [f"## Training seeds at {target_name(main)}%", "",
             "Each training seed's ratios (means over the evaluation seeds); then their mean ± std.", "",
             "| family | " + " | ".join(f"seed {s}" for s in context.settings.training_seeds) + " | mean ± std |",
             "|---|" + "---|" * (len(context.settings.training_seeds) + 1)]
    for family in ("pyevo", "uniform", "diff-pruning"):
        picked = _seed_arms(rows, family, main)
        if not picked:
            continue
        for figure in ("balanced_fd", "fd"):
            values = {r["arm"].training_seed: r["summary"][figure]["ratio"] for r in picked
                      if r["summary"] and figure in r["summary"]}
            cells = [_fmt(values.get(s)) for s in context.settings.training_seeds]
            known = list(values.values())
            total = (f"{statistics.mean(known):.3f} ± {statistics.stdev(known):.3f}" if len(known) > 1 else "pending")
            lines.append(f"| {picked[0]['arm'].label}: {FIGURE_NAMES[figure]} ratio | " + " | ".join(cells)
                         + f" | {total} |")
    lines.append("")
    families = {"pyevo": spread} | {family: over_training_seeds(rows, family, main)
                                    for family in ("uniform", "diff-pruning")}
    if all(families.values()):
        ours = families["pyevo"]
        cells = [f"{label} (MACs {_fmt(families[family].macs)}, {families[family].seeds} seeds): "
                 f"{verdict(ours.summary, families[family].summary, 'balanced_fd')}; "
                 f"{verdict(ours.summary, families[family].summary, 'fd')}"
                 for family, label in (("uniform", "uniform width"), ("diff-pruning", "Diff-Pruning"))]
        lines += ["Over the training seeds (each family's mean over them and the std of its seeds' means, the "
                  f"verdict rule as above), pyevo diffnas (MACs {_fmt(ours.macs)}, {ours.seeds} seeds) against "
                  + " · ".join(cells)
                  + " (class-balanced FD; FD).", ""]
    return lines


def _seed_arms(rows: dict[str, dict], family: str, target: float) -> list[dict]:
    """The rows of a family's arms at ``target``, one per training seed (pyevo's: its diffnas arms)."""
    return [r for r in rows.values() if r["arm"].family == family and r["arm"].target == target
            and (family != "pyevo" or r["arm"].name.startswith("pyevo-diffnas"))]


def over_training_seeds(rows: dict[str, dict], family: str, target: float) -> TrainingSeedSpread | None:
    """A family's arms at ``target`` over its training seeds (None until at least two seeds have finished)."""
    picked = [r for r in _seed_arms(rows, family, target) if r["summary"]]
    if len(picked) < 2:
        return None
    summaries = [r["summary"] for r in picked]
    summary = {figure: {"mean": statistics.mean(p[figure]["mean"] for p in summaries),
                        "std": statistics.stdev(p[figure]["mean"] for p in summaries)}
               for figure in FIGURES if all(figure in p for p in summaries)}
    return TrainingSeedSpread(summary, statistics.mean(r["made"]["macs_ratio"] for r in picked), len(picked))


def _ablation_lines(context: StudyContext, rows: dict[str, dict], spread: TrainingSeedSpread | None) -> list[str]:
    m = target_name(context.settings.main_target)
    reference = rows.get(f"pyevo-diffnas-{m}")
    ablations = [r for r in rows.values() if r["arm"].family == "ablation"]
    if reference is None or not ablations:
        return []
    end = "the teacher's prediction" if default_end_target(context.settings) == "teacher" else "the true noise"
    lines = [f"## Ablations at {m}% (against pyevo diffnas at {m}%, dynamic loss, end target {end})", "",
             "Each verdict is the ablation's against the reference. Both are one training seed's models: the first "
             "two verdicts count the evaluation noise alone, the last two also pyevo diffnas's spread over training "
             "seeds at this target (each model's std widened by it; *Training seeds* above), which a single seed "
             "hides." + ("" if spread else " That spread is pending."), "",
             "| ablation | class-balanced FD | FD | same class | class-balanced FD: ablation vs reference | FD: "
             "ablation vs reference | class-balanced FD, training noise counted | FD, training noise counted |",
             "|---|---|---|---|---|---|---|---|"]
    for row in [reference] + ablations:
        cells = (["—"] * 4 if row is reference else
                 [verdict(row["summary"], reference["summary"], f) for f in ("balanced_fd", "fd")]
                 + [verdict(with_training_noise(row["summary"], spread),
                            with_training_noise(reference["summary"], spread), f) for f in ("balanced_fd", "fd")])
        lines.append(f"| {row['arm'].label if row is not reference else 'pyevo diffnas (reference)'} | "
                     f"{_figure(row, 'balanced_fd')} | {_figure(row, 'fd')} | {_figure(row, 'agreement', 3)} | "
                     + " | ".join(cells) + " |")
    build = (reference["made"] or {}).get("base_search_sha256")
    apart = [row["arm"].label for row in ablations if row["made"] and build
             and row["made"].get("base_search_sha256") not in (None, build)]
    if apart:
        lines += ["", f"- From another build of the base than the reference's (`{build[:8]}`; see the setup above), so "
                  "the build's float rounding is confounded with what the ablation changes: " + ", ".join(apart) + "."]
    return lines + [""]


def _verdict_lines(context: StudyContext, rows: dict[str, dict], spread: TrainingSeedSpread | None) -> list[str]:
    """Plain statements: pyevo against each alternative per target, and the paper's two claims (``spread``:
    pyevo diffnas's over training seeds at the main target, counted in the claims' second verdict)."""
    lines = ["## Where pyevo wins and where it loses", "",
             "pyevo diffnas at each target against each alternative (class-balanced FD; FD), as the verdict "
             "rule in the opening of this page says. The arms land at different MACs for the same target; "
             "*At equal MACs* and *At equal or lower measured latency* below compare them at the same cost. Each "
             "verdict here is between one training seed's models and counts evaluation noise alone; how far a model "
             "moves with its training seed is measured at the main target (*Training seeds*).", ""]

    def summary(name: str) -> dict | None:
        row = rows.get(name)
        return row["summary"] if row else None

    def pooled(names: list[str]) -> dict | None:
        """The mean over arms (random genomes) of their means, with the std of those means."""
        parts = [summary(n) for n in names]
        if not parts or any(p is None for p in parts):
            return None
        out = {}
        for figure in FIGURES:
            if all(figure in p for p in parts):
                means = [p[figure]["mean"] for p in parts]
                out[figure] = {"mean": statistics.mean(means),
                               "std": statistics.stdev(means) if len(means) > 1 else parts[0][figure]["std"]}
        return out

    def macs(names: list[str]) -> str:
        """The arms' mean MACs and, once timed, mean measured latency (fractions of the teacher's)."""
        values = [rows[n]["made"]["macs_ratio"] for n in names if n in rows and rows[n]["made"]]
        timed = [rows[n]["latency"]["ratio"] for n in names if n in rows and rows[n]["latency"]]
        if not values or len(values) < len(names):  # a pool's mean once every arm of it has finished
            return ""
        latency = f", latency {statistics.mean(timed):.3f}" if len(timed) == len(names) else ""
        return f" (MACs {statistics.mean(values):.3f}{latency})"

    for t in context.settings.targets:
        n = target_name(t)
        ours = summary(f"pyevo-diffnas-{n}")
        randoms = [a for a in rows if a.startswith(f"random-{n}-")]
        others = {"pyevo budget (latency rule)": ([f"pyevo-budget-{n}"], summary(f"pyevo-budget-{n}")),
                  "uniform width": ([f"uniform-{n}"], summary(f"uniform-{n}")),
                  "Diff-Pruning": ([f"diff-pruning-{n}"], summary(f"diff-pruning-{n}")),
                  "random genomes": (randoms, pooled(randoms))}
        cells = [f"{label}{macs(names)}: {verdict(ours, other, 'balanced_fd')}; {verdict(ours, other, 'fd')}"
                 for label, (names, other) in others.items()]
        lines.append(f"- at {n}%, pyevo{macs([f'pyevo-diffnas-{n}'])} against " + " · ".join(cells))
    bk_made = rows["bk-sdm"]["made"] if "bk-sdm" in rows else None
    if bk_made:
        # Against the pyevo student nearest it in MACs (BK-SDM's removal lands where it lands, not at a target).
        made = {n: rows[f"pyevo-diffnas-{n}"]["made"] for n in map(target_name, context.settings.targets)
                if f"pyevo-diffnas-{n}" in rows and rows[f"pyevo-diffnas-{n}"]["made"]}
        if made:
            n = min(made, key=lambda k: abs(made[k]["macs_ratio"] - bk_made["macs_ratio"]))
            ours, bk = summary(f"pyevo-diffnas-{n}"), summary("bk-sdm")
            lines.append(f"- BK-SDM removal (MACs {_fmt(bk_made['macs_ratio'])}) against pyevo at {n}% (MACs "
                         f"{_fmt(made[n]['macs_ratio'])}, the nearest): pyevo {verdict(ours, bk, 'balanced_fd')}; "
                         f"{verdict(ours, bk, 'fd')}")
    nocap = rows.get("pyevo-diffnas-nocap")
    if nocap and nocap["made"] and nocap["summary"]:
        twins = next((g for g in same_students(rows) if "pyevo-diffnas-nocap" in g), [])
        also = [rows[n]["arm"] for n in twins if n != "pyevo-diffnas-nocap"]
        lines.append(f"- What the diffnas rule finds on its own (caps off): MACs {_fmt(nocap['made']['macs_ratio'])}, "
                     f"params {_fmt(nocap['made']['params_ratio'])}, class-balanced FD "
                     f"{_fmt(nocap['summary']['balanced_fd']['ratio'])}x, FD {_fmt(nocap['summary']['fd']['ratio'])}x"
                     + (f"; the same student as {', '.join(f'{a.label} at {_target_text(a)}' for a in also)}, whose "
                        "cap does not bind" if also else "") + ".")
    m = target_name(context.settings.main_target)
    reference = summary(f"pyevo-diffnas-{m}")
    if f"ablation-loss-end-only-{m}" in rows:
        def claim(ablation: str, figure: str) -> str:
            """Dynamic's verdict on ``figure`` against ``ablation``: over evaluation noise, then counting training
            seeds'."""
            other = summary(f"ablation-loss-{ablation}-{m}")
            counted = (verdict(with_training_noise(reference, spread), with_training_noise(other, spread), figure)
                       if spread else "pending")
            return f"{verdict(reference, other, figure)} (counting training-seed noise: {counted})"

        lines += ["", "The paper's claims, at " + m + "% (one training seed each; in brackets the verdict counting "
                  "pyevo diffnas's spread over training seeds, as in *Ablations*):",
                  f"- *The joint loss helps* (dynamic against end-only): dynamic is {claim('end-only', 'balanced_fd')} "
                  f"on class-balanced FD, {claim('end-only', 'fd')} on FD.",
                  f"- *Its dynamic weighting is needed* (dynamic against static and hard): against static "
                  f"{claim('static', 'balanced_fd')}, against hard {claim('hard', 'balanced_fd')} (class-balanced FD)."]
    latency_rows = [rows.get(f"ablation-global-{m}"), rows.get(f"pyevo-diffnas-{m}"), rows.get(f"pyevo-budget-{m}")]
    if all(r is not None for r in latency_rows):
        described = []
        for label, row in zip(("MACs budget alone (global: least summed NSR, latency not considered)",
                               "MACs cap with the diffnas rule (each block's fastest measured candidate within "
                               "its NSR slack)", "measured-latency budget (budget rule)"), latency_rows):
            lat = row["latency"]
            described.append(f"{label}: measured latency "
                             + ("pending" if lat is None else f"{lat['ratio']:.3f}x the teacher") + ", MACs "
                             f"{_fmt((row['quality'] or row['made'] or {}).get('macs_ratio'))}")
        lines += ["", f"- A MACs budget against a measured-latency budget at {m}%: " + "; ".join(described) + "."]
    return lines + [""]


def pyevo_curve(rows: dict[str, dict]) -> list[tuple[float, dict]]:
    """pyevo diffnas's students (the targets' and the caps-off one; training seed 0) as (MACs ratio, summary),
    by MACs."""
    return sorted(((row["made"]["macs_ratio"], row["summary"]) for name, row in rows.items()
                   if name.startswith("pyevo-diffnas-") and row["arm"].training_seed == 0 and row["made"]
                   and row["summary"]), key=lambda point: point[0])


def read_curve(curve: list[tuple[float, dict]], macs: float) -> dict | None:
    """The curve's summary at ``macs``, linear between its two nearest points (means, stds and ratios);
    None outside the MACs it spans."""
    for (x0, s0), (x1, s1) in zip(curve, curve[1:]):
        if x0 <= macs <= x1:
            w = 0.0 if x1 == x0 else (macs - x0) / (x1 - x0)
            out = {}
            for figure in s0.keys() & s1.keys():
                out[figure] = {k: None if s0[figure][k] is None or s1[figure][k] is None
                               else (1 - w) * s0[figure][k] + w * s1[figure][k] for k in ("mean", "std", "ratio")}
            return out
    return None


def _equal_macs_lines(rows: dict[str, dict]) -> list[str]:
    """Each other arm against pyevo's curve read at that arm's own MACs: the arms land at different MACs
    (a pruned arm where its channel granularity allows), so a comparison at the same target is not one
    at the same cost."""
    curve = pyevo_curve(rows)
    others = [row for row in rows.values() if row["arm"].family in ("uniform", "diff-pruning", "bk-sdm", "random")
              and row["arm"].training_seed == 0 and row["made"] and row["summary"]]
    if len(curve) < 2 or not others:
        return []
    span = f"{curve[0][0]:.3f}–{curve[-1][0]:.3f}"
    lines = ["## At equal MACs", "",
             f"pyevo diffnas's students (MACs {span}), read linearly in MACs at each other arm's "
             "own MACs (means, stds and ratios interpolated between the two nearest), against that arm: "
             "the verdict is pyevo's.", "",
             "| arm | MACs | its class-balanced FD | pyevo's there | verdict | its FD | pyevo's there | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for row in sorted(others, key=lambda r: r["made"]["macs_ratio"]):
        macs = row["made"]["macs_ratio"]
        ours = read_curve(curve, macs)
        name = row["arm"].label + (f" `{row['arm'].name}`" if row["arm"].family == "random" else "")
        if ours is None:
            lines.append(f"| {name} | {macs:.3f} | {_figure(row, 'balanced_fd')} | outside {span} | — | "
                         f"{_figure(row, 'fd')} | outside {span} | — |")
            continue
        lines.append(f"| {name} | {macs:.3f} | {_figure(row, 'balanced_fd')} | "
                     f"{_figure({'summary': ours}, 'balanced_fd')} | {verdict(ours, row['summary'], 'balanced_fd')} | "
                     f"{_figure(row, 'fd')} | {_figure({'summary': ours}, 'fd')} | {verdict(ours, row['summary'], 'fd')} |")
    return lines + [""]


def _equal_latency_lines(rows: dict[str, dict]) -> list[str]:
    """Each other arm against the best (least mean class-balanced FD) of pyevo diffnas's students (training seed
    0) that are no slower than it in measured latency: pyevo's front, read at the arm's latency. Picking the best
    of several noisy means favours pyevo a little; the page says how many were there to pick from."""
    # One student timed in several units (arms that are one student) stands at the mean of its timings: which
    # of them counted would otherwise depend on the order of the rows.
    groups = same_students(rows)
    twins = {name for group in groups for name in group[1:]}
    timed = {name: row["latency"]["ratio"] for name, row in rows.items() if row["latency"]}
    for group in groups:
        if all(n in timed for n in group):
            timed[group[0]] = statistics.mean(timed[n] for n in group)
    students = sorted(((timed[name], name) for name, row in rows.items()
                       if name.startswith("pyevo-diffnas-") and name not in twins and row["arm"].training_seed == 0
                       and name in timed and row["summary"]))
    others = [row for row in rows.values() if row["arm"].family in ("uniform", "diff-pruning", "bk-sdm", "random")
              and row["arm"].training_seed == 0 and row["latency"] and row["summary"]]
    if not students or not others:
        return []
    lines = ["## At equal or lower measured latency", "",
             "Against each other arm, the best (least mean class-balanced FD) of pyevo diffnas's students (training "
             "seed 0, one per target and the caps-off one where it differs) that are no slower than it in measured "
             "CPU latency: the comparison is at equal or lower cost. The count in brackets is how many of pyevo's "
             "students were that fast: picking the best of several noisy means favours pyevo a little. The verdict "
             "is pyevo's."]
    for group in groups:
        timings = [rows[n]["latency"]["ratio"] for n in group if rows[n]["latency"]]
        if len(timings) > 1:
            lines.append(f"The latency's repeatability: one student timed in {len(timings)} units gave "
                         f"{', '.join(f'{t:.3f}' for t in timings)} of the teacher's (it stands at their mean here).")
    lines += ["", "| arm | its latency / teacher | its class-balanced FD | pyevo's student: target, latency | its class-balanced FD "
              "| verdict | its FD | pyevo's FD | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(others, key=lambda r: r["latency"]["ratio"]):
        ratio = row["latency"]["ratio"]
        name = row["arm"].label + (f" `{row['arm'].name}`" if row["arm"].family == "random" else "")
        below = [(lat, n) for lat, n in students if lat <= ratio]
        if not below:
            lines.append(f"| {name} | {ratio:.3f} | {_figure(row, 'balanced_fd')} | none as fast | — | — | "
                         f"{_figure(row, 'fd')} | — | — |")
            continue
        lat, ours_name = min(below, key=lambda item: rows[item[1]]["summary"]["balanced_fd"]["mean"])
        ours = rows[ours_name]
        lines.append(f"| {name} | {ratio:.3f} | {_figure(row, 'balanced_fd')} | "
                     f"{_target_text(ours['arm'])}, {lat:.3f} (of {len(below)}) | {_figure(ours, 'balanced_fd')} | "
                     f"{verdict(ours['summary'], row['summary'], 'balanced_fd')} | {_figure(row, 'fd')} | "
                     f"{_figure(ours, 'fd')} | {verdict(ours['summary'], row['summary'], 'fd')} |")
    return lines + [""]


def _plots(folder: Path, teacher: dict | None, rows: dict[str, dict]) -> list[tuple[str, str]]:
    """Quality against MACs and against measured latency, every arm on one chart per figure."""
    points = [r for r in rows.values() if r["summary"] and "balanced_fd" in r["summary"]]
    if not points:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyevo.report import _save_figure

    drawn = []
    for x_key, x_label, file in (("macs", "MACs / teacher", "quality_vs_macs.png"),
                                 ("latency", "measured CPU latency / teacher", "quality_vs_latency.png")):
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, figure_key in zip(axes, ("balanced_fd", "fd")):
            for family, marker in FAMILY_MARKERS.items():
                xs, ys, es = [], [], []
                for r in points:
                    if r["arm"].family != family:
                        continue
                    x = (r["quality"]["macs_ratio"] if x_key == "macs"
                         else (r["latency"] or {}).get("ratio"))
                    entry = r["summary"][figure_key]
                    if x is None or entry["ratio"] is None:
                        continue
                    scale = entry["ratio"] / entry["mean"]  # the std in units of the teacher's mean
                    xs.append(x), ys.append(entry["ratio"]), es.append(entry["std"] * scale)
                if xs:
                    ax.errorbar(xs, ys, yerr=es, fmt=marker, capsize=2, label=family)
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"{FIGURE_NAMES[figure_key]} / teacher")
            ax.grid(alpha=0.3)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=8)
        figure.tight_layout()
        _save_figure(figure, folder / file)
        plt.close(figure)
        drawn.append((f"quality vs {x_label}", file))
    return drawn


def _time_lines(context: StudyContext, finished: dict[str, dict]) -> list[str]:
    lines = ["## Wall time per unit", "", "| unit | seconds | threads | stages (s) |", "|---|---|---|---|"]
    total = 0.0
    for name in context.units:  # in the plan's order
        result = finished.get(name)
        if result is None:
            continue
        total += result["seconds"]
        stages = result["result"].get("stages") or {}
        lines.append(f"| {name} | {result['seconds']:.0f} | {result.get('threads', '—')} | "
                     + (", ".join(f"{k} {v:.0f}" for k, v in stages.items()) or "—") + " |")
    return lines + ["", f"Units' wall time summed: {total / 3600:.2f} h (units in the parallel phase overlap).", ""]
