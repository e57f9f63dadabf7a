"""Checks on a finished LDM CelebA-HQ-256 run, and its table (generated from the run's report.json).

(a) the supernet built from the teacher's UNet: its teacher-shaped path reproduces every teacher
    block on the block inputs recorded from one teacher forward on 3x64x64 latents (max abs
    difference), in float32 and in float64 (where only rounding can separate the two);
(b) the exported student, in a fresh Python process: reloaded with
    ``pyevo.StudentUNet2DModel.from_pretrained``, one forward whose output has the teacher's shape,
    and one generation through ``diffusers.LDMPipeline(vqvae=<the teacher's VQModel>,
    unet=<the student>, scheduler=<the teacher's DDIMScheduler>)``: 256x256 RGB images out;
(c) the table: teacher vs student MACs, params, measured latency, the per-block latency estimate
    and its error, the VQ decode time and one batch of images (UNet steps + one decode), with
    the machine and the date. The teacher has random weights, so every row is an architecture
    figure; quality numbers are not reported.

The shared checks and the table live in ``experiments/arch_checks.py``.

    python experiments/ldm_celebahq/check.py --teacher runs/ldm_celebahq/teacher --run runs/ldm_celebahq/run
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: the shared arch_checks

from arch_checks import check_reload, load_after, print_teacher_path, table, teacher_output_shape  # noqa: E402

# In a fresh interpreter: the student as a user loads it, then as the unet of diffusers' own
# LDMPipeline beside the teacher's VQ-VAE and scheduler (nothing of pyevo's sampler involved).
RELOAD_AND_GENERATE = r"""
import json, sys, time, torch, pyevo
from diffusers import DDIMScheduler, LDMPipeline, VQModel
student_folder, teacher_folder, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
student = pyevo.StudentUNet2DModel.from_pretrained(student_folder).eval()
size = student.config.sample_size
x = torch.randn(2, student.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = student(x, torch.tensor([10, 900])).sample
vqvae = VQModel.from_pretrained(teacher_folder, subfolder="vqvae").eval()
scheduler = DDIMScheduler.from_pretrained(teacher_folder, subfolder="scheduler")
pipe = LDMPipeline(vqvae=vqvae, unet=student, scheduler=scheduler)
pipe.set_progress_bar_config(disable=True)
start = time.perf_counter()
images = pipe(batch_size=1, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
              output_type="np").images
seconds = time.perf_counter() - start
print(json.dumps({"class": type(student).__name__, "shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
                  "params": sum(p.numel() for p in student.parameters()),
                  "pipeline": type(pipe).__name__, "vqvae": type(vqvae).__name__, "scheduler": type(scheduler).__name__,
                  "images_shape": list(images.shape), "images_finite": bool((images == images).all()),
                  "images_range": [float(images.min()), float(images.max())], "steps": steps,
                  "pipeline_seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the LDMPipeline folder (unet/, vqvae/, scheduler/)")
    parser.add_argument("--run", required=True, help="the pyevo run folder (report.json, student/)")
    parser.add_argument("--load-before", default=None, help="`uptime` load average before the run")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the LDMPipeline generation in (b)")
    args = parser.parse_args()
    run = Path(args.run)
    report = json.loads((run / "report.json").read_text())
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())

    failed = print_teacher_path(args.teacher)

    print("(b) student reloaded in a fresh process, then one LDMPipeline generation with the teacher's VQ-VAE")
    teacher_shape = [2, *teacher_output_shape(args.teacher)]
    got = check_reload(run / "student", args.teacher, str(args.steps), script=RELOAD_AND_GENERATE)
    print(f"  {got['class']}: output {got['shape']} (teacher {teacher_shape}), finite {got['finite']}, "
          f"{got['params']:,} params (report: {report['student']['params']:,})")
    print(f"  {got['pipeline']}(vqvae={got['vqvae']}, unet={got['class']}, scheduler={got['scheduler']}), "
          f"{got['steps']} steps: images {got['images_shape']}, finite {got['images_finite']}, "
          f"range [{got['images_range'][0]:.3f}, {got['images_range'][1]:.3f}], {got['pipeline_seconds']:.1f} s")
    if got["shape"] != teacher_shape or not got["finite"] or got["params"] != report["student"]["params"]:
        failed.append(("reload", got))
    if got["images_shape"] != [1, 256, 256, 3] or not got["images_finite"]:
        failed.append(("LDMPipeline", got))

    print("(c) table")
    text = table(report, config, {"before": args.load_before, "after": load_after()}, "LDM CelebA-HQ-256")
    (run / "table.md").write_text(text + "\n")
    print(text)
    if failed:
        raise SystemExit(f"checks failed: {failed}")


if __name__ == "__main__":
    main()
