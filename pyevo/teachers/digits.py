"""Train (and evaluate) the built-in 16x16 digits teacher.

    python -m pyevo.teachers.digits                # train, write pyevo/assets/digits_teacher/
    python -m pyevo.teachers.digits --evaluate     # quality check of the shipped teacher

Training: DDPM epsilon-prediction loss on the digits training split with Min-SNR-5 weighting
(Hang et al., 2023: per-timestep weight min(SNR, 5) / SNR, which stops the nearly noise-free
timesteps from dominating the gradient and speeds up convergence), 1000-step cosine
(``squaredcos_cap_v2``) schedule, AdamW with linear warm-up then cosine decay, gradient clipping,
and an EMA of the weights; the EMA weights are what is shipped. No augmentation: flips and
rotations change what a digit is. Everything is seeded, and runs on the CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from tqdm import tqdm

from pyevo.data import DIGITS_SIZE, digits
from pyevo.teachers import DIGITS_TEACHER_DIR

log = logging.getLogger(__name__)


def build_digits_unet() -> UNet2DModel:
    """The digits teacher's architecture, untrained.

    Three resolution levels (16, 8, 4) with widths 32/64/64 and 2 ResNet layers per block;
    self-attention in the 8x8 down/up blocks (and in the 4x4 mid block, diffusers' default), with
    head dim 16, so 4 heads at 64 channels. 8 GroupNorm groups keep whole groups at width ratios
    0.5 and 0.75, which the search space uses.
    """
    return UNet2DModel(
        sample_size=DIGITS_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )


def build_digits_scheduler() -> DDPMScheduler:
    """1000-step DDPM schedule; the cosine schedule keeps signal in more steps at 16x16 than linear."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


@dataclass
class TeacherTrainConfig:
    steps: int = 8000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    snr_gamma: float = 5.0  # Min-SNR weighting; 0 gives the plain (unweighted) epsilon loss
    # P2 weighting (Choi et al., 2022), a further factor 1 / (p2_k + SNR) ** p2_gamma that favours
    # the high-noise steps where a sample's class is decided; 0 leaves it out.
    p2_gamma: float = 0.0
    p2_k: float = 1.0
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    # One thread: on the shared 2-core machine, two OpenMP threads slow down 5-40x whenever
    # another process (a compiler) takes a core; one thread degrades only in proportion.
    num_threads: int = 1
    log_every: int = 250
    out: str = str(DIGITS_TEACHER_DIR)
    checkpoint_every: int = 0  # > 0: also write the EMA pipeline to checkpoint_dir/step_N every N steps
    checkpoint_dir: str = ""


def timestep_weights(snr: torch.Tensor, cfg: TeacherTrainConfig) -> torch.Tensor:
    """Per-sample weights of the epsilon loss at signal-to-noise ratios ``snr``: Min-SNR-gamma
    ``min(SNR, snr_gamma) / SNR`` (if snr_gamma > 0) times P2 ``1 / (p2_k + SNR) ** p2_gamma``
    (if p2_gamma > 0)."""
    weights = torch.ones_like(snr)
    if cfg.snr_gamma > 0:
        weights = weights * snr.clamp(max=cfg.snr_gamma) / snr
    if cfg.p2_gamma > 0:
        weights = weights / (cfg.p2_k + snr) ** cfg.p2_gamma
    return weights


def _lr_factor(step: int, cfg: TeacherTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def _ema_update(ema: UNet2DModel, model: UNet2DModel, step: int, max_decay: float) -> None:
    # The warm-up keeps the EMA from being dominated by the random initial weights early on.
    decay = min(max_decay, (1 + step) / (10 + step))
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.lerp_(p, 1.0 - decay)


def save_pipeline(pipeline: DiffusionPipeline, out: Path, info: dict) -> None:
    """Write a built-in teacher's pipeline folder atomically (built next to ``out``, then swapped in),
    with its ``training_info.json``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
        # mkdtemp and the safetensors writer create owner-only files; the shipped asset is world-readable.
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def train(cfg: TeacherTrainConfig) -> Path:
    """Train the teacher and write its pipeline folder to ``cfg.out``; returns that path."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: TeacherTrainConfig) -> Path:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    images, _ = digits("train")
    unet = build_digits_unet()
    ema = build_digits_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    scheduler = build_digits_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod
    n_train = len(images)
    log.info(
        "training digits teacher: %d params, %d train images, %d steps of batch %d",
        sum(p.numel() for p in unet.parameters()), n_train, cfg.steps, cfg.batch_size,
    )

    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))

    order = torch.randperm(n_train, generator=gen)
    cursor = 0
    running, history = 0.0, []
    start = time.perf_counter()
    unet.train()
    for step in tqdm(range(cfg.steps), desc="teacher", mininterval=5.0):
        # Epoch-wise shuffling without replacement.
        if cursor + cfg.batch_size > n_train:
            order, cursor = torch.randperm(n_train, generator=gen), 0
        x0 = images[order[cursor:cursor + cfg.batch_size]]
        cursor += cfg.batch_size

        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        per_sample = F.mse_loss(unet(xt, t).sample, noise, reduction="none").mean(dim=(1, 2, 3))
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        loss = (per_sample * timestep_weights(snr, cfg)).mean()

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        _ema_update(ema, unet, step, cfg.ema_decay)

        running += loss.item()
        if (step + 1) % cfg.log_every == 0:
            mean_loss = running / cfg.log_every
            history.append({"step": step + 1, "loss": mean_loss})
            log.info("step %d  loss %.4f  lr %.2e  %.0f s", step + 1, mean_loss, sched.get_last_lr()[0],
                     time.perf_counter() - start)
            running = 0.0
        if cfg.checkpoint_every > 0 and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            checkpoint = Path(cfg.checkpoint_dir or cfg.out + ".checkpoints") / f"step_{step + 1}"
            save_pipeline(DDPMPipeline(unet=ema, scheduler=scheduler), checkpoint,
                          {"config": dataclasses.asdict(cfg), "step": step + 1})
            log.info("checkpoint %s", checkpoint)

    seconds = time.perf_counter() - start
    info = {
        "config": dataclasses.asdict(cfg),
        "train_images": n_train,
        "seconds": round(seconds, 1),
        "loss_history": history,
        "torch": torch.__version__,
    }
    out = Path(cfg.out)
    ema.eval()
    save_pipeline(DDPMPipeline(unet=ema, scheduler=scheduler), out, info)
    log.info("wrote digits teacher (EMA weights) to %s after %.0f s", out, seconds)
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pyevo.teachers.digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluate", action="store_true", help="evaluate a trained teacher instead of training")
    parser.add_argument("--teacher", default=str(DIGITS_TEACHER_DIR), help="teacher folder to evaluate")
    parser.add_argument("--report", default="experiments/digits_teacher.md",
                        help="markdown file the evaluation writes ('' to skip)")
    for field in dataclasses.fields(TeacherTrainConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parse_args(argv)
    if args.evaluate:
        from pyevo.teachers.evaluate import evaluate_cli
        evaluate_cli(args.teacher, args.report or None, num_threads=args.num_threads)
        return
    cfg = TeacherTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherTrainConfig)})
    train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
