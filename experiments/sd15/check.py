"""Checks on a finished SD-v1.5-shaped run, and its tables (generated from the run's report.json, the
architecture facts file of arch_facts.py, and BK-SDM's published figures).

(a) the supernet built from the teacher's UNet: its teacher-shaped path reproduces every teacher block
    on the block inputs recorded from one teacher forward on 4x64x64 latents at the conditions' text
    states (max abs difference), in float32 and in float64;
(b) the exported student, in a fresh Python process: reloaded with ``pyevo.load_student``, one forward
    whose output has the teacher's shape, and one guided generation through
    ``diffusers.StableDiffusionPipeline(vae=<the teacher's AutoencoderKL>, unet=<the student>,
    scheduler=<a DDIMScheduler from the teacher's scheduler config>, text_encoder=None,
    tokenizer=None)``, called with ``prompt_embeds`` / ``negative_prompt_embeds`` from the conditions
    file (there is no text encoder): 512x512 RGB images out;
(c) the tables: the run's teacher vs student (MACs, params, measured latency, the per-block estimate,
    the VAE decode and one batch of images), the full-width SD-v1.5 UNet's own figures beside the run's
    reduced-width teacher (arch_facts.json), and BK-SDM's published UNet sizes, marked as theirs.

The shared checks and the run table live in ``experiments/arch_checks.py``.

    python experiments/sd15/check.py --teacher runs/sd15/teacher_w4 --conditions runs/sd15/conditions.safetensors \
        --run runs/sd15/run_w4 --arch-facts runs/sd15/arch_facts.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: the shared arch_checks

import safetensors.torch  # noqa: E402

from arch_checks import check_reload, load_after, print_teacher_path, table, teacher_output_shape  # noqa: E402

# In a fresh interpreter: the student as a user loads it, then as the unet of diffusers' own
# StableDiffusionPipeline beside the teacher's VAE and a DDIM scheduler (nothing of pyevo's sampler).
RELOAD_AND_GENERATE = r"""
import json, sys, time, torch, pyevo, safetensors.torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
student_folder, teacher_folder, conditions_file, steps, guidance = sys.argv[1:6]
steps, guidance = int(steps), float(guidance)
student = pyevo.load_student(student_folder).eval()
conditions = safetensors.torch.load_file(conditions_file)
states, negative = conditions["encoder_hidden_states"], conditions["negative_encoder_hidden_states"]
size = student.config.sample_size
x = torch.randn(2, student.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = student(x, torch.tensor([10, 900]), encoder_hidden_states=states[:2]).sample
vae = AutoencoderKL.from_pretrained(teacher_folder, subfolder="vae").eval()
scheduler = DDIMScheduler.from_pretrained(teacher_folder, subfolder="scheduler")
pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=student, scheduler=scheduler,
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
start = time.perf_counter()
images = pipe(prompt_embeds=states[:1], negative_prompt_embeds=negative, guidance_scale=guidance,
              num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np").images
seconds = time.perf_counter() - start
print(json.dumps({"class": type(student).__name__, "base": type(student).__mro__[1].__name__,
                  "shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
                  "params": sum(p.numel() for p in student.parameters()),
                  "pipeline": type(pipe).__name__, "vae": type(vae).__name__, "scheduler": type(scheduler).__name__,
                  "images_shape": list(images.shape), "images_finite": bool((images == images).all()),
                  "images_range": [float(images.min()), float(images.max())], "steps": steps,
                  "guidance_scale": guidance, "pipeline_seconds": seconds}))
"""

# Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion" (arXiv 2305.15798,
# ECCV 2024), and its model card (github.com/Nota-NetsPresso/BK-SDM, MODEL_CARD.md): UNet parameters, in
# billions. Their numbers, not ours: block-removed UNets of SD-v1.4 (same UNet as v1.5), trained weights.
BK_SDM = [("SD-v1.4 / v1.5 (the source)", 0.86), ("BK-SDM-Base", 0.58), ("BK-SDM-Small", 0.49), ("BK-SDM-Tiny", 0.33)]


def architecture_table(facts: dict, report: dict) -> str:
    """The SD-v1.5 UNet at full width and the reduced widths (arch_facts.json), one process's timings."""
    lines = [
        f"SD-v1.5 UNet architecture (random weights), batch 1, 4x64x64 latents, 77x768 text states; measured "
        f"{facts['date']}, torch {facts['torch']}, float32, {facts['widths'][0]['threads']} threads, median of "
        f"{facts['widths'][0]['latency_repeats']} after 1 warm-up, at nice 19 beside other jobs (load "
        f"{facts['load_before']} before, {facts['load_after']} after): indicative latencies.",
        "",
        "| width | block_out_channels | params | MACs (batch 1) | latency (ms, batch 1) | supernet params | "
        "distill tensors (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in facts["widths"]:
        width = "full (SD-v1.5)" if row["width_divisor"] == 1 else f"1/{row['width_divisor']}"
        lines.append(f"| {width} | {','.join(map(str, row['block_out_channels']))} | {row['params']:,} | "
                     f"{row['macs']:,} | {row['latency_ms']:.0f} | {row['supernet_params']:,} | "
                     f"{row['distill_tensor_bytes'] / 2**30:.1f} |")
    lines += ["", "distill tensors = 4 bytes x (teacher + 4 x supernet): the supernet's weights, gradients and "
              "Adam's two moments beside the teacher, float32, before any activation."]
    return "\n".join(lines)


def bk_sdm_table(report: dict, facts: dict | None, divisor: int) -> str:
    full = None if facts is None else next((r for r in facts["widths"] if r["width_divisor"] == 1), None)
    r = report["ratios"]
    lines = [
        "| UNet | params (B) | MACs | params / SD's | whose figure |",
        "|---|---|---|---|---|",
    ]
    for name, billions in BK_SDM:
        lines.append(f"| {name} | {billions:.2f} | | {billions / 0.86:.2f} | BK-SDM paper (Kim et al. 2023) |")
    if full is not None:
        lines.append(f"| SD-v1.5 config, built here | {full['params'] / 1e9:.4f} | {full['macs'] / 1e9:.1f} G | 1.00 | "
                     "ours, measured (random weights) |")
    lines.append(f"| pyevo student of the 1/{divisor}-width teacher | "
                 f"{report['student']['params'] / 1e9:.4f} | {report['student']['macs'] / 1e9:.1f} G | "
                 f"{r['params']:.2f} of its teacher | ours, this run (random weights, reduced width) |")
    lines += ["", "BK-SDM's MACs are left blank: no published figure was found in this session's sources. Their "
              "models are trained and evaluated (FID, CLIP score); ours are random-weight architecture figures "
              "at a reduced width, whose student ratio does not transfer to the full-width UNet."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the StableDiffusionPipeline folder (unet/, vae/, scheduler/)")
    parser.add_argument("--conditions", required=True, help="the text-states safetensors file of the run")
    parser.add_argument("--run", required=True, help="the pyevo run folder (report.json, student/)")
    parser.add_argument("--arch-facts", default=None, help="arch_facts.py's JSON (full-width figures)")
    parser.add_argument("--load-before", default=None, help="`uptime` load average before the run")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the StableDiffusionPipeline generation in (b)")
    parser.add_argument("--skip-float64", action="store_true", help="check (a) in float32 only")
    args = parser.parse_args()
    run = Path(args.run)
    report = json.loads((run / "report.json").read_text())
    import torch
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    unet_config = json.loads((Path(args.teacher) / "unet" / "config.json").read_text())
    divisor = 320 // unet_config["block_out_channels"][0]
    states = safetensors.torch.load_file(args.conditions)["encoder_hidden_states"]

    dtypes = (torch.float32,) if args.skip_float64 else (torch.float32, torch.float64)
    failed = print_teacher_path(args.teacher, encoder_hidden_states=states, dtypes=dtypes)

    print("(b) student reloaded in a fresh process, then one StableDiffusionPipeline generation with the teacher's VAE")
    teacher_shape = [2, *teacher_output_shape(args.teacher)]
    guidance = float(config.get("guidance_scale", 7.5))
    got = check_reload(run / "student", args.teacher, args.conditions, str(args.steps), str(guidance),
                       script=RELOAD_AND_GENERATE)
    print(f"  {got['class']} (a {got['base']}): output {got['shape']} (teacher {teacher_shape}), finite {got['finite']}, "
          f"{got['params']:,} params (report: {report['student']['params']:,})")
    print(f"  {got['pipeline']}(vae={got['vae']}, unet={got['class']}, scheduler={got['scheduler']}, no text encoder), "
          f"prompt_embeds, guidance {got['guidance_scale']:g}, {got['steps']} steps: images {got['images_shape']}, "
          f"finite {got['images_finite']}, range [{got['images_range'][0]:.3f}, {got['images_range'][1]:.3f}], "
          f"{got['pipeline_seconds']:.1f} s")
    if got["shape"] != teacher_shape or not got["finite"] or got["params"] != report["student"]["params"]:
        failed.append(("reload", got))
    if got["images_shape"] != [1, 512, 512, 3] or not got["images_finite"]:
        failed.append(("StableDiffusionPipeline", got))

    print("(c) tables")
    width = ",".join(map(str, unet_config["block_out_channels"]))
    text = table(report, config, {"before": args.load_before, "after": load_after()},
                 f"SD-v1.5 UNet at 1/{divisor} width, block_out_channels {width}")
    text += (f"\n\nText-conditional at random states [{len(states)}, {states.shape[1]}, {states.shape[2]}] (stand-ins "
             f"for CLIP ViT-L/14's), data-free, guidance {guidance:g}. Latencies are one UNet call at batch 1; "
             "a guided pipeline step makes two (or one at batch 2).")
    facts = json.loads(Path(args.arch_facts).read_text()) if args.arch_facts else None
    if facts is not None:
        text += "\n\n" + architecture_table(facts, report)
    text += "\n\n" + bk_sdm_table(report, facts, divisor)
    (run / "table.md").write_text(text + "\n")
    print(text)
    if failed:
        raise SystemExit(f"checks failed: {failed}")


if __name__ == "__main__":
    main()
