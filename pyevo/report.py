"""The run's report: ``report.json``, ``report.md`` and PNG plots in the run folder."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from pyevo.diffusion import prediction_type  # noqa: E402
from pyevo.latency import device_name  # noqa: E402
from pyevo.runfolder import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json  # noqa: E402
from pyevo.teacher import is_class_conditional, is_text_conditional  # noqa: E402
from pyevo.training import resolve_train_dtype  # noqa: E402

log = logging.getLogger(__name__)


def _runtime_label(timed: dict) -> str:
    return f", {timed['runtime']} runtime" if "runtime" in timed else ""


def _other_runtime_rows(t: dict, s: dict, device: str) -> list[str]:
    """The whole networks under the runtime the run did not time its blocks with, timed in the same turns
    (``pyevo.runtime``: lean is what ``pyevo.optimize`` runs)."""
    if "runtimes_ms" not in t or "runtimes_ms" not in s:
        return []  # an evaluation from before both runtimes were timed
    same = "; on the CPU the same modules as lean: the gap is noise" if torch.device(device).type == "cpu" else ""
    return [f"| latency, measured (ms, {name} runtime{same}) | {t['runtimes_ms'][name]:.3f} | {s['runtimes_ms'][name]:.3f} | "
            f"{s['runtimes_ms'][name] / t['runtimes_ms'][name]:.3f} |"
            for name in sorted(t["runtimes_ms"]) if name != t["runtime"]]


def write_report(folder: Path, config, spaces, results, selected: dict, evaluated: dict,
                 seconds: dict[str, float], teacher, student, scheduler, codec=None, context=None,
                 owners: dict[str, int] | None = None) -> dict:
    """``context``: the run's :class:`pyevo.distributed.Context` (its world size and each rank's device);
    ``owners``: under torchrun, the rank that searched each block."""
    t, s = evaluated["teacher"], evaluated["student"]
    measured_ratio = s["latency_ms"] / t["latency_ms"]
    # The selection's estimate was timed minutes or days before the evaluation (the persisted
    # table), when the machine may have run faster or slower: compare it as a ratio to the teacher.
    selection_ratio = selected["latency_estimate_ms"] / selected["teacher_ms"]
    report = {
        "device": config.device,
        "device_name": device_name(config.device),
        "torch": torch.__version__,
        "dtype": config.dtype,
        "batch": config.batch,
        "seed": config.seed,
        "rule": selected["rule"],
        "train_dtype": str(resolve_train_dtype(config.train_dtype, config.device)).removeprefix("torch."),
        "prediction_type": prediction_type(scheduler),
        "class_conditional": is_class_conditional(teacher),
        "text_conditional": is_text_conditional(teacher),
        # Text-conditional samples (data-free trajectories, evaluation) are guided at this scale.
        "guidance_scale": config.guidance_scale if is_text_conditional(teacher) else None,
        "features": evaluated.get("features"),
        "clip": evaluated.get("clip"),
        "latent": _latent(config, teacher, codec, evaluated),
        "teacher": dict(t),
        "student": {**s,
                    "latency_estimate_error": (s["latency_estimate_ms"] - s["latency_ms"]) / s["latency_ms"],
                    "genome": selected["genome"]},
        "selection": {"teacher_ms": selected["teacher_ms"], "stem_ms": selected["stem_ms"],
                      "student_estimate_ms": selected["latency_estimate_ms"],
                      "latency_ratio_estimate": selection_ratio,
                      "latency_ratio_error": (selection_ratio - measured_ratio) / measured_ratio},
        "blocks": {name: {"pick": selected["blocks"][name], "teacher": results[name].teacher.to_dict(),
                          "front_size": len(results[name].front), "evaluated": len(results[name].evaluated)}
                   for name in spaces},
        "stages": {name: {"seconds": value} for name, value in seconds.items()},
        "world_size": 1 if context is None else context.world_size,
        "ranks": _ranks(config, context, owners),
        "ratios": {"macs": s["macs"] / t["macs"], "params": s["params"] / t["params"], "latency": measured_ratio,
                   "fd": (s["fd"] / t["fd"]) if s.get("fd") and t.get("fd") else None,
                   "kid": _kid_ratio(t, s)},
    }
    if report["latent"] is not None:
        report["ratios"]["batch_of_images"] = (report["latent"]["student_batch_ms"]
                                               / report["latent"]["teacher_batch_ms"])
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    _plot_fronts(plots / "pareto_fronts.png", results, selected)
    _plot_losses(plots / "losses.png", read_json(folder / "distill.json")["history"],
                 read_json(folder / "retrain.json")["history"])
    samples_file = folder / "samples.safetensors"
    if samples_file.is_file():
        _plot_samples(plots / "samples.png", safetensors.torch.load_file(samples_file))
    atomic_write_json(folder / "report.json", report)
    atomic_write_text(folder / "report.md", _markdown(report))
    log.info("report written to %s", folder / "report.md")
    return report


def _ranks(config, context, owners: dict[str, int] | None) -> list[dict]:
    """Each rank's device (and the name the latency table keys its timings by) and, under torchrun,
    the blocks it searched."""
    ranks = [dict(entry) for entry in (context.ranks if context is not None and context.ranks else
                                      [{"rank": 0, "device": config.device, "device_name": device_name(config.device)}])]
    if owners:
        for entry in ranks:
            entry["blocks"] = [name for name, rank in owners.items() if rank == entry["rank"]]
    return ranks


def _latent(config, teacher, codec, evaluated: dict) -> dict | None:
    """A latent teacher's autoencoder, and the time of one batch of images as a pipeline makes it:
    ``ddim_steps`` UNet calls, then one decode."""
    if codec is None:
        return None
    from pyevo.teacher import sample_shape

    steps, decode_ms = config.evaluate.ddim_steps, evaluated["decode_ms"]
    latent_shape = sample_shape(teacher)
    return {"autoencoder": codec.kind, "folder": str(codec.folder), "scaling_factor": codec.scaling_factor,
            "shift_factor": codec.shift_factor, "latent_shape": list(latent_shape),
            "image_shape": list(codec.image_shape(latent_shape)),
            "posterior": None if config.data == "data-free" else config.vae_posterior,
            "decode_ms": decode_ms, "ddim_steps": steps,
            "teacher_batch_ms": steps * evaluated["teacher"]["latency_ms"] + decode_ms,
            "student_batch_ms": steps * evaluated["student"]["latency_ms"] + decode_ms}


def _fmt(value, spec: str = ".4g") -> str:
    return "—" if value is None else format(value, spec)


def _clip_rows(report: dict) -> list[str]:
    """The CLIP score row where one was computed, else the note saying why not (when a model was named)."""
    clip, t, s = report.get("clip") or {}, report["teacher"], report["student"]
    if t.get("clip_score") is not None:
        ratio = s["clip_score"] / t["clip_score"] if t["clip_score"] else None  # floored at 0: maybe no ratio
        return [f"| CLIP score ({clip['model']}) | {t['clip_score']:.2f} | {s['clip_score']:.2f} | {_fmt(ratio, '.3f')} |"]
    if clip.get("model"):
        return [f"| CLIP score | — | — | {clip['note']} |"]
    return []


def _kid_ratio(teacher: dict, student: dict) -> float | None:
    """student / teacher KID, only where both are clearly above zero (mean above its spread over
    subsets): the unbiased estimate of a near-zero KID is noise around zero, often negative."""
    for side in (teacher, student):
        if side.get("kid_mean") is None or side["kid_mean"] <= side["kid_std"]:
            return None
    return student["kid_mean"] / teacher["kid_mean"]


def _kid(figures: dict) -> str:
    if figures.get("kid_mean") is None:
        return "—"
    return f"{figures['kid_mean']:.4g} ± {figures['kid_std']:.2g}"


def _latent_rows(report: dict) -> list[str]:
    latent = report.get("latent")
    if latent is None:
        return []
    return [f"| decode, once per batch ({latent['autoencoder']}, ms) | {latent['decode_ms']:.3f} | "
            f"{latent['decode_ms']:.3f} | the teacher's |",
            f"| one batch of images: {latent['ddim_steps']} UNet steps + decode (ms) | "
            f"{latent['teacher_batch_ms']:.1f} | {latent['student_batch_ms']:.1f} | "
            f"{report['ratios']['batch_of_images']:.3f} |"]


def _latent_note(report: dict) -> list[str]:
    latent = report.get("latent")
    if latent is None:
        return []
    shape = "x".join(map(str, latent["latent_shape"]))
    image = "x".join(map(str, latent["image_shape"]))
    how = (f"training images encoded once (posterior {latent['posterior']})" if latent["posterior"]
           else "data-free: latents sampled from the teacher")
    return [f"Latent teacher: {shape} latents of {image} images through the {latent['autoencoder']} in "
            f"`{latent['folder']}` (scaling factor {latent['scaling_factor']:.5g}); {how}; every image figure "
            "below is of decoded samples.", ""]


def _ranks_note(report: dict) -> list[str]:
    if report.get("world_size", 1) == 1:
        return []
    parts = [f"rank {r['rank']} on {r['device']} ({r['device_name']})"
             + (f": searched {', '.join(r['blocks'])}" if r.get("blocks") else "") for r in report["ranks"]]
    return [f"Distributed over {report['world_size']} processes (torchrun): " + "; ".join(parts) + ".", ""]


def _markdown(report: dict) -> str:
    t, s, r, sel = report["teacher"], report["student"], report["ratios"], report["selection"]
    lines = [
        "# pyevo run report",
        "",
        f"Device: {report['device']} ({report['device_name']}), torch {report['torch']}, "
        f"{report['dtype']}, batch {report['batch']}, seed {report['seed']}, rule {report['rule']}; "
        f"trained under {report['train_dtype']}; prediction type {report['prediction_type']}"
        f"{', class-conditional' if report['class_conditional'] else ''}"
        f"{', text-conditional (guidance scale %g)' % report['guidance_scale'] if report['text_conditional'] else ''}.",
        "",
        *_ranks_note(report),
        f"Quality: {(report.get('features') or {}).get('note', '—')}.",
        "",
        *_latent_note(report),
        "| | teacher | student | student / teacher |",
        "|---|---|---|---|",
        f"| MACs (batch 1) | {t['macs']:,} | {s['macs']:,} | {r['macs']:.3f} |",
        f"| params | {t['params']:,} | {s['params']:,} | {r['params']:.3f} |",
        f"| latency, measured (ms{_runtime_label(t)}) | {t['latency_ms']:.3f} | {s['latency_ms']:.3f} | "
        f"{r['latency']:.3f} |",
        *_other_runtime_rows(t, s, report["device"]),
        f"| latency, per-block estimate (ms) | — | {s['latency_estimate_ms']:.3f} | "
        f"error {100 * s['latency_estimate_error']:+.1f}% |",
        f"| latency at selection, per-block estimate (ms) | {sel['teacher_ms']:.3f} | "
        f"{sel['student_estimate_ms']:.3f} | {sel['latency_ratio_estimate']:.3f} "
        f"(error {100 * sel['latency_ratio_error']:+.1f}%) |",
        *_latent_rows(report),
        f"| Fréchet distance | {_fmt(t.get('fd'))} | {_fmt(s.get('fd'))} | {_fmt(r['fd'], '.3f')} |",
        f"| KID (mean ± std over subsets) | {_kid(t)} | {_kid(s)} | {_fmt(r.get('kid'), '.3f')} |",
        f"| PSNR / SSIM vs teacher (same noise) | — | {s['psnr_vs_teacher']:.2f} dB / "
        f"{s['ssim_vs_teacher']:.3f} | |",
        f"| same class as the teacher (same noise) | — | {_fmt(s.get('class_agreement'), '.3f')} | |",
        *_clip_rows(report),
        "",
    ]
    if t.get("class_coverage"):
        lines += ["Class shares of the samples (digits classifier):", "",
                  "| | " + " | ".join(str(c) for c in range(len(t["class_coverage"]))) + " |",
                  "|---" * (len(t["class_coverage"]) + 1) + "|",
                  "| teacher | " + " | ".join(f"{v:.3f}" for v in t["class_coverage"]) + " |",
                  "| student | " + " | ".join(f"{v:.3f}" for v in s["class_coverage"]) + " |", ""]
    if s.get("per_class"):
        lines += ["Per class (the conditioning label; same noise and label for teacher and student):", "",
                  "| class | PSNR vs teacher (dB) | SSIM vs teacher | same class as the teacher |", "|---|---|---|---|"]
        lines += [f"| {label} | {v['psnr_vs_teacher']:.2f} | {v['ssim_vs_teacher']:.3f} | "
                  f"{_fmt(v.get('class_agreement'), '.3f')} |" for label, v in s["per_class"].items()]
        lines.append("")
    lines += ["## Blocks", "", "| block | pick | NSR | latency (ms) | MACs | params | teacher-shaped NSR "
              "| teacher latency (ms) |", "|---|---|---|---|---|---|---|---|"]
    for name, block in report["blocks"].items():
        p, tb = block["pick"], block["teacher"]
        lines.append(f"| {name} | `{p['genome']}` | {p['nsr']:.4g} | {p['latency_ms']:.3f} | {p['macs']:,} | "
                     f"{p['params']:,} | {tb['nsr']:.4g} | {tb['latency_ms']:.3f} |")
    lines += ["", f"Student genome: `{s['genome']}`", "", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {value['seconds']:.1f} |" for name, value in report["stages"].items()]
    lines += ["", "Plots: `plots/pareto_fronts.png`, `plots/losses.png`, `plots/samples.png`.", ""]
    return "\n".join(lines)


def _plot_fronts(path: Path, results, selected: dict) -> None:
    names = list(results)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        result = results[name]
        ax.scatter([c.latency_ms for c in result.evaluated], [c.nsr for c in result.evaluated],
                   s=8, c="0.7", label="evaluated")
        ax.plot([c.latency_ms for c in result.front], [c.nsr for c in result.front], "o-", ms=3, label="front")
        ax.scatter([result.teacher.latency_ms], [result.teacher.nsr], marker="*", s=120, c="k", label="teacher-shaped")
        pick = selected["blocks"][name]
        ax.scatter([pick["latency_ms"]], [pick["nsr"]], s=90, facecolors="none", edgecolors="r", lw=2, label="pick")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("NSR")
        ax.set_yscale("log")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_losses(path: Path, distill_history: list[dict], retrain_history: list[dict]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name in [k for k in (distill_history[0] if distill_history else {}) if k != "step"]:
        left.plot([h["step"] for h in distill_history], [h[name] for h in distill_history], lw=1, label=name)
    left.set(title="block-wise distillation (MSE, mean over sandwich paths)", xlabel="step", yscale="log")
    left.legend(fontsize=6)
    if retrain_history:
        steps = [h["step"] for h in retrain_history]
        right.plot(steps, [h["end_loss"] for h in retrain_history], lw=1, label="end-to-end ε loss")
        nsr = [(h["step"], h["block_nsr"]) for h in retrain_history if "block_nsr" in h]
        if nsr:
            right.plot(*zip(*nsr), lw=1, label="mean block NSR")
        right.set(yscale="log", xlabel="step", title="retraining")
        twin = right.twinx()
        twin.plot(steps, [h["lambda"] for h in retrain_history], "k--", lw=1, label="λ")
        twin.set_ylabel("λ")
        right.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_samples(path: Path, samples: dict[str, torch.Tensor], count: int = 32) -> None:
    fig, axes = plt.subplots(2, 1, figsize=(12, 3.4))
    for ax, name in zip(axes, ("teacher", "student")):
        images = ((samples[name][:count] + 1) / 2).clamp(0, 1)
        row = torch.cat(list(images), dim=-1)  # C, H, count*W
        ax.imshow(row.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{name} (same noise)", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    """PNG bytes through the run folder's atomic writer: a kill never leaves half a plot."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
