"""Teacher and student of a finished run, evaluated at several noise seeds: mean ± std per figure
and the student/teacher ratio of the means (quality figures move with the seed).

    python experiments/seed_eval.py RUN_FOLDER [--seeds 0 1 2] [--n 1000] [--steps 50]

Reads the run's config.yaml (teacher, scheduler, vae, data) and student/; prints a markdown table.
Digits-like runs only (the FD is in the digits classifier's features, against the held-out digits at
the teacher's image size); a latent teacher's samples are decoded by its autoencoder first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pyevo.autoencoder import teacher_autoencoder
from pyevo.config import load_config
from pyevo.sample import sample_images
from pyevo.student import load_student
from pyevo.study.quality import DigitsReference, mean_std, sample_figures, summarise
from pyevo.teacher import load_teacher, sample_shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    run = Path(args.run)
    config = load_config(run / "config.yaml")
    teacher, scheduler = load_teacher(config.teacher, config.scheduler or None)
    student = load_student(run / "student", low_cpu_mem_usage=False).eval()
    codec = teacher_autoencoder(config.teacher, config.vae or None)
    shape = sample_shape(teacher) if codec is None else codec.image_shape(sample_shape(teacher))
    # The figures of pyevo.study.quality: FD, class-balanced FD (70 samples of each class the classifier
    # sees), the class mixture's TV distance, and the paired PSNR / SSIM / same class.
    reference = DigitsReference(shape[-1])
    figures = {"teacher": {}, "student": {}}
    for seed in args.seeds:
        samples = {name: sample_images(model, scheduler.config, args.n, args.steps, seed, codec, progress=False)
                   for name, model in (("teacher", teacher), ("student", student))}
        figures["teacher"][str(seed)] = sample_figures(samples["teacher"], None, reference, seed)
        figures["student"][str(seed)] = sample_figures(samples["student"], samples["teacher"], reference, seed)
        print(f"seed {seed}: {figures['student'][str(seed)]}", file=sys.stderr)
    print(f"{run}: {args.n} samples, {args.steps} DDIM steps, seeds {args.seeds}\n")
    print("| seed | teacher FD | student FD | FD ratio | teacher class-balanced FD | student class-balanced FD "
          "| ratio | class mixture TV: teacher / student | PSNR vs teacher (dB) | SSIM | same class |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seed in map(str, args.seeds):
        t, s = figures["teacher"][seed], figures["student"][seed]
        print(f"| {seed} | {t['fd']:.2f} | {s['fd']:.2f} | {s['fd'] / t['fd']:.3f} | {t['balanced_fd']:.2f} "
              f"| {s['balanced_fd']:.2f} | {s['balanced_fd'] / t['balanced_fd']:.3f} "
              f"| {t['mixture_tv']:.3f} / {s['mixture_tv']:.3f} | {s['psnr']:.2f} | {s['ssim']:.3f} | {s['agreement']:.3f} |")

    def spread(name: str, key: str) -> str:
        mean, std = mean_std([figures[name][seed][key] for seed in map(str, args.seeds)])
        return f"{mean:.3f} ± {std:.3f}" if len(args.seeds) > 1 else f"{mean:.3f}"

    summary = summarise(figures["student"], figures["teacher"])
    print(f"| mean ± std | {spread('teacher', 'fd')} | {spread('student', 'fd')} | {summary['fd']['ratio']:.3f} "
          f"(of the means) | {spread('teacher', 'balanced_fd')} | {spread('student', 'balanced_fd')} | "
          f"{summary['balanced_fd']['ratio']:.3f} (of the means) | {spread('teacher', 'mixture_tv')} / "
          f"{spread('student', 'mixture_tv')} | {spread('student', 'psnr')} | {spread('student', 'ssim')} | "
          f"{spread('student', 'agreement')} |")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
