"""Teacher and student of a finished run, evaluated at several noise seeds: mean ± std per figure
and the student/teacher ratio of the means (quality figures move with the seed).

    python experiments/seed_eval.py RUN_FOLDER [--seeds 0 1 2] [--n 1000] [--steps 50]

Reads the run's config.yaml (teacher, scheduler, vae, data) and student/; prints a markdown table.
Digits-like runs only (the FD is in the digits classifier's features, against the held-out digits at
the teacher's image size); a latent teacher's samples are decoded by its autoencoder first.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from pyevo import StudentUNet2DModel
from pyevo.config import load_config
from pyevo.data import digits
from pyevo.classifier import load_digits_classifier
from pyevo.data import at_digits_size
from pyevo.metrics import class_agreement, class_mixture_distance, frechet_distance, psnr, ssim
from pyevo.teachers.evaluate import balanced_index
from pyevo.autoencoder import teacher_autoencoder
from pyevo.sample import sample_images
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
    student = StudentUNet2DModel.from_pretrained(run / "student", low_cpu_mem_usage=False).eval()
    codec = teacher_autoencoder(config.teacher, config.vae or None)
    shape = sample_shape(teacher) if codec is None else codec.image_shape(sample_shape(teacher))
    reference, reference_labels = digits("heldout", size=shape[-1])
    classifier = load_digits_classifier()

    def balanced_fd(samples: torch.Tensor, seed: int) -> float:
        # 70 samples of each class the classifier sees (as the teacher's quality check does): FD
        # without the class mixture, which otherwise dominates this feature space.
        labels = classifier.predict(at_digits_size(samples))
        return frechet_distance(samples[balanced_index(labels, 70, seed)], reference, classifier)

    rows = []
    for seed in args.seeds:
        samples = {name: sample_images(model, scheduler.config, args.n, args.steps, seed, codec, progress=False)
                   for name, model in (("teacher", teacher), ("student", student))}
        rows.append({"seed": seed, "teacher_fd": frechet_distance(reference, samples["teacher"]),
                     "student_fd": frechet_distance(reference, samples["student"]),
                     "teacher_bfd": balanced_fd(samples["teacher"], seed),
                     "student_bfd": balanced_fd(samples["student"], seed),
                     "teacher_tv": class_mixture_distance(samples["teacher"], reference_labels, classifier),
                     "student_tv": class_mixture_distance(samples["student"], reference_labels, classifier),
                     "psnr": psnr(samples["student"], samples["teacher"]),
                     "ssim": ssim(samples["student"], samples["teacher"]),
                     "agreement": class_agreement(samples["student"], samples["teacher"])})
        print(f"seed {seed}: {rows[-1]}", file=sys.stderr)
    print(f"{run}: {args.n} samples, {args.steps} DDIM steps, seeds {args.seeds}\n")
    print("| seed | teacher FD | student FD | FD ratio | teacher class-balanced FD | student class-balanced FD "
          "| ratio | class mixture TV: teacher / student | PSNR vs teacher (dB) | SSIM | same class |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['teacher_fd']:.2f} | {r['student_fd']:.2f} | {r['student_fd'] / r['teacher_fd']:.3f} "
              f"| {r['teacher_bfd']:.2f} | {r['student_bfd']:.2f} | {r['student_bfd'] / r['teacher_bfd']:.3f} "
              f"| {r['teacher_tv']:.3f} / {r['student_tv']:.3f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['agreement']:.3f} |")

    def mean_std(key: str) -> str:
        values = [r[key] for r in rows]
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    ratio_of_means = {key: statistics.mean(r[f"student_{key}"] for r in rows) /
                      statistics.mean(r[f"teacher_{key}"] for r in rows) for key in ("fd", "bfd")}
    print(f"| mean ± std | {mean_std('teacher_fd')} | {mean_std('student_fd')} | {ratio_of_means['fd']:.3f} "
          f"(of the means) | {mean_std('teacher_bfd')} | {mean_std('student_bfd')} | {ratio_of_means['bfd']:.3f} "
          f"(of the means) | {mean_std('teacher_tv')} / {mean_std('student_tv')} | {mean_std('psnr')} | {mean_std('ssim')} | {mean_std('agreement')} |")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
