"""Train (and evaluate) the built-in latent-digits teacher: a small latent diffusion model.

    python -m pyevo.teachers.latent_digits               # train, write pyevo/assets/latent_digits_teacher/
    python -m pyevo.teachers.latent_digits --evaluate    # quality check -> experiments/latent_digits_teacher.md

It exists so that pyevo has a latent, Stable-Diffusion-shaped teacher that needs nothing from
outside: an autoencoder maps 1x32x32 digits to 4x8x8 latents, and a UNet diffuses in that latent
space. Two stages, both seeded, on the CPU with one thread:

1. ``AutoencoderKL`` (3 levels: 32x32 -> 8x8, 4 latent channels), trained on the digits training
   split at 32x32 with an L1 + L2 reconstruction loss on posterior samples and a small KL term, so
   the posterior stays a well-scaled Gaussian and the decoder is used to slightly noisy latents.
   Then, as Stable Diffusion did, ``scaling_factor`` = 1 / std of the training latents (posterior
   mode), so the diffusion sees latents of unit variance.
2. ``UNet2DModel`` on those latents (posterior mode x scaling_factor, encoded once): the same
   recipe as the pixel digits teacher (``pyevo.teachers.digits``: epsilon loss, Min-SNR-5, AdamW
   with warm-up and cosine decay, EMA weights shipped), 1000-step cosine schedule.

The folder is an ``LDMPipeline`` folder (``unet/``, ``vqvae/`` — LDMPipeline's name for the
autoencoder, which it only calls as ``decode(latents / scaling_factor)`` — ``scheduler/``), so
``diffusers.LDMPipeline.from_pretrained(folder)`` samples from it as from any LDM.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, LDMPipeline, UNet2DModel
from tqdm import tqdm

from pyevo.autoencoder import LatentCodec, teacher_autoencoder

from pyevo.data import digits
from pyevo.teachers import LATENT_DIGITS_TEACHER_DIR
from pyevo.teachers.digits import TeacherTrainConfig, _ema_update, _lr_factor, save_pipeline, timestep_weights

if TYPE_CHECKING:
    from pyevo.teachers.evaluate import TeacherEvalConfig, TeacherEvalResult

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
LATENT_CHANNELS = 4


def _ints(text: str) -> tuple[int, ...]:
    """``"32,64,64"`` -> ``(32, 64, 64)`` (widths are strings in the config so the CLI can set them)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected positive comma-separated integers, got {text!r}")
    return values


def build_vae(channels: tuple[int, ...] = (16, 32, 64), norm_groups: int = 8, layers_per_block: int = 1) -> AutoencoderKL:
    """The latent-digits autoencoder, untrained: ``len(channels)`` levels, so 32x32 images give
    (32 / 2**(levels-1))-sized latents with 4 channels (8x8 at 3 levels)."""
    levels = len(channels)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_groups,
        sample_size=IMAGE_SIZE,
    )


def build_latent_unet(sample_size: int = 8, channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 2,
                      norm_groups: int = 8, attention_head_dim: int = 32) -> UNet2DModel:
    """The latent-digits UNet, untrained.

    Three levels (8, 4, 2 at 8x8 latents), self-attention at the 4x4 level (and in the 2x2 mid
    block, diffusers' default), head dim 32, so 2 heads at 64 channels: the head-ratio choice
    applies. Widths 32/64/64, as the pixel digits teacher, at a quarter of its MACs (the latents
    are 8x8, not 16x16), so the whole search stays cheap on a 2-core CPU. 8 GroupNorm groups keep
    whole groups at width ratios 0.5 and 0.75.
    """
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=norm_groups,
        attention_head_dim=attention_head_dim,
    )


def build_latent_scheduler() -> DDIMScheduler:
    """1000-step DDPM schedule as a DDIMScheduler config (what LDMPipeline samples with).

    Cosine (``squaredcos_cap_v2``): at 8x8 latents the linear schedule is near pure noise over the
    last third of its steps, the cosine one spreads the signal-to-noise ratio evenly. No clipping:
    latents of unit variance are not bounded by [-1, 1].
    """
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=False)


@dataclass
class LatentTeacherTrainConfig:
    # Stage 1: the autoencoder.
    vae_steps: int = 1400
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    vae_warmup_steps: int = 50
    vae_kl_weight: float = 1e-5  # on the per-image KL sum; the reconstruction terms are per-pixel means
    vae_channels: str = "16,32,64"
    vae_norm_groups: int = 8
    # Reuse the autoencoder (and its scaling factor) of this latent-digits folder; skips stage 1.
    vae_from: str = ""
    # Stage 2: the latent UNet (the pixel digits teacher's recipe).
    steps: int = 7000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    snr_gamma: float = 5.0
    p2_gamma: float = 0.0
    p2_k: float = 1.0
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    unet_channels: str = "32,64,64"
    unet_layers_per_block: int = 2
    unet_norm_groups: int = 8
    attention_head_dim: int = 32
    seed: int = 0
    num_threads: int = 1  # one thread: see TeacherTrainConfig.num_threads
    log_every: int = 250
    out: str = str(LATENT_DIGITS_TEACHER_DIR)


def _schedule(cfg: LatentTeacherTrainConfig, stage: str) -> TeacherTrainConfig:
    """The digits teacher's config holding one stage's step counts and loss weights, for the helpers
    shared with ``pyevo.teachers.digits`` (``_lr_factor``, ``timestep_weights``)."""
    if stage == "vae":
        return TeacherTrainConfig(steps=cfg.vae_steps, warmup_steps=cfg.vae_warmup_steps)
    return TeacherTrainConfig(steps=cfg.steps, warmup_steps=cfg.warmup_steps, snr_gamma=cfg.snr_gamma,
                              p2_gamma=cfg.p2_gamma, p2_k=cfg.p2_k)


class _Batches:
    """Epoch-wise shuffled batches of indices without replacement, from one seeded generator."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the {n} training images")
        self.n, self.batch_size, self.gen = n, batch_size, gen
        self.order, self.cursor = torch.randperm(n, generator=gen), 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch_size > self.n:
            self.order, self.cursor = torch.randperm(self.n, generator=self.gen), 0
        batch = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch


def train(cfg: LatentTeacherTrainConfig) -> Path:
    """Train both stages and write the LDMPipeline folder to ``cfg.out``; returns that path."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: LatentTeacherTrainConfig) -> Path:
    images, _ = digits("train", size=IMAGE_SIZE)
    info: dict = {"config": dataclasses.asdict(cfg), "train_images": len(images), "torch": torch.__version__}

    if cfg.vae_from:
        vae = AutoencoderKL.from_pretrained(Path(cfg.vae_from) / "vqvae", local_files_only=True)
        source = json.loads((Path(cfg.vae_from) / "training_info.json").read_text())
        source_config = {k: v for k, v in source.get("config", {}).items() if k.startswith("vae_") or k == "seed"}
        info["vae"] = {**source.get("vae", {}), "config": source_config, "reused_from": str(cfg.vae_from)}
        log.info("reusing the autoencoder of %s (scaling factor %.4f)", cfg.vae_from, vae.config.scaling_factor)
    else:
        torch.manual_seed(cfg.seed)
        vae, info["vae"] = train_vae(images, cfg, torch.Generator().manual_seed(cfg.seed))
    vae.eval().requires_grad_(False)
    latents = LatentCodec(vae).encode(images)
    info["latents"] = {"shape": list(latents.shape[1:]), "mean": round(latents.mean().item(), 4),
                       "std": round(latents.std().item(), 4)}

    # Stage 2 has its own seeds, so a run on an earlier run's autoencoder (vae_from) trains the UNet
    # that one run of both stages would have.
    torch.manual_seed(cfg.seed + 1)
    unet, info["unet"] = train_unet(latents, cfg, torch.Generator().manual_seed(cfg.seed + 1))
    # Both stages' training time, also when the autoencoder was trained by an earlier run (vae_from).
    info["seconds"] = round(info["vae"].get("seconds", 0.0) + info["unet"]["seconds"], 1)
    out = Path(cfg.out)
    # LDMPipeline's component is named vqvae; it only calls decode(latents / scaling_factor), which
    # an AutoencoderKL has.
    save_pipeline(LDMPipeline(vqvae=vae, unet=unet, scheduler=build_latent_scheduler()), out, info)
    log.info("wrote latent-digits teacher (EMA UNet weights) to %s after %.0f s of training", out, info["seconds"])
    return out


def train_vae(images: torch.Tensor, cfg: LatentTeacherTrainConfig, gen: torch.Generator) -> tuple[AutoencoderKL, dict]:
    """Stage 1: the autoencoder, then its ``scaling_factor`` (1 / std of the training latents)."""
    vae = build_vae(_ints(cfg.vae_channels), cfg.vae_norm_groups)
    log.info("training the autoencoder: %d params, %d steps of batch %d, KL weight %g",
             sum(p.numel() for p in vae.parameters()), cfg.vae_steps, cfg.vae_batch_size, cfg.vae_kl_weight)
    schedule = _schedule(cfg, "vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, schedule))
    batches = _Batches(len(images), cfg.vae_batch_size, gen)
    running = {"rec": 0.0, "kl": 0.0}
    history = []
    start = time.perf_counter()
    vae.train()
    for step in tqdm(range(cfg.vae_steps), desc="autoencoder", mininterval=5.0):
        x = images[batches.next()]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=gen)).sample
        rec = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x)
        kl = posterior.kl().mean()
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        running["rec"] += rec.item()
        running["kl"] += kl.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vae_steps:
            count = (step % cfg.log_every) + 1
            entry = {"step": step + 1, "reconstruction": running["rec"] / count, "kl": running["kl"] / count}
            history.append(entry)
            log.info("autoencoder step %d  reconstruction %.4f  KL %.1f  %.0f s", step + 1, entry["reconstruction"],
                     entry["kl"], time.perf_counter() - start)
            running = {"rec": 0.0, "kl": 0.0}
    seconds = time.perf_counter() - start
    vae.eval()
    vae.register_to_config(scaling_factor=1.0)
    std = LatentCodec(vae).encode(images).std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    log.info("autoencoder: latent std %.4f -> scaling factor %.4f", std, 1.0 / std)
    return vae, {"seconds": round(seconds, 1), "loss_history": history, "scaling_factor": 1.0 / std,
                 "params": sum(p.numel() for p in vae.parameters())}


def train_unet(latents: torch.Tensor, cfg: LatentTeacherTrainConfig, gen: torch.Generator) -> tuple[UNet2DModel, dict]:
    """Stage 2: the latent UNet (epsilon loss, Min-SNR, EMA), as ``pyevo.teachers.digits`` trains the
    pixel teacher; returns the EMA weights."""
    build = dict(sample_size=latents.shape[-1], channels=_ints(cfg.unet_channels),
                 layers_per_block=cfg.unet_layers_per_block, norm_groups=cfg.unet_norm_groups,
                 attention_head_dim=cfg.attention_head_dim)
    if latents.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"expected {LATENT_CHANNELS}-channel latents, got {latents.shape[1]}")
    unet = build_latent_unet(**build)
    ema = build_latent_unet(**build)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    alphas_cumprod = build_latent_scheduler().alphas_cumprod
    schedule = _schedule(cfg, "unet")
    log.info("training the latent UNet: %d params, %d latents %s, %d steps of batch %d",
             sum(p.numel() for p in unet.parameters()), len(latents), tuple(latents.shape[1:]), cfg.steps,
             cfg.batch_size)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, schedule))
    batches = _Batches(len(latents), cfg.batch_size, gen)
    running, history = 0.0, []
    start = time.perf_counter()
    unet.train()
    for step in tqdm(range(cfg.steps), desc="latent unet", mininterval=5.0):
        z0 = latents[batches.next()]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, len(alphas_cumprod), (z0.shape[0],), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        per_sample = F.mse_loss(unet(zt, t).sample, noise, reduction="none").mean(dim=(1, 2, 3))
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        loss = (per_sample * timestep_weights(snr, schedule)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        _ema_update(ema, unet, step, cfg.ema_decay)
        running += loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean_loss = running / ((step % cfg.log_every) + 1)
            history.append({"step": step + 1, "loss": mean_loss})
            log.info("unet step %d  loss %.4f  lr %.2e  %.0f s", step + 1, mean_loss, sched.get_last_lr()[0],
                     time.perf_counter() - start)
            running = 0.0
    ema.eval()
    return ema, {"seconds": round(time.perf_counter() - start, 1), "loss_history": history,
                 "params": sum(p.numel() for p in unet.parameters())}


# --- evaluation -----------------------------------------------------------------------------------


@dataclass
class LatentTeacherEvalResult:
    """The pixel teacher's figures for the decoded samples, plus the autoencoder's own figures."""

    samples: TeacherEvalResult  # latents from pyevo.sample.ddim_sample, decoded
    vae_psnr_heldout: float  # dB, reconstructions (posterior mode) vs held-out images
    fd_vae_reconstruction: float  # reconstructions vs held-out: the autoencoder's own floor
    heldout_latent_mean: float
    heldout_latent_std: float  # after scaling_factor; ~1 when the factor is right
    sampled_latent_std: float
    total_seconds: float


def load_latent_teacher(folder: str | Path) -> tuple[LatentCodec, UNet2DModel, object]:
    """The autoencoder, the UNet and the schedule, through pyevo's own loaders."""
    from pyevo.teacher import load_teacher

    folder = Path(folder)
    if not (folder / "vqvae" / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a latent-digits teacher folder (no vqvae/config.json)")
    unet, scheduler = load_teacher(str(folder))
    return teacher_autoencoder(str(folder)), unet, scheduler


def sample_latent_digits(codec: LatentCodec, unet: UNet2DModel, scheduler_config, n: int, steps: int = 50,
                         seed: int = 0, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` decoded digits (N, 1, 32, 32) in [-1, 1] and their latents: pyevo's DDIM sampler in latent
    space (unclamped: latents of unit variance are not images), then the autoencoder."""
    from pyevo.sample import ddim_sample

    latents = ddim_sample(unet, scheduler_config, n, steps=steps, seed=seed, progress=progress, clip_output=False)
    return codec.decode(latents), latents


def evaluate_latent_teacher(folder: str | Path, cfg: TeacherEvalConfig | None = None) -> LatentTeacherEvalResult:
    """The digits teacher's quality check (``pyevo.teachers.evaluate``) on decoded latent samples,
    with the autoencoder's reconstruction PSNR and FD on the held-out digits."""
    from pyevo.metrics import frechet_distance, psnr
    from pyevo.teachers.evaluate import TeacherEvalConfig, evaluate_samples

    # The bar for this teacher is on the class-balanced FD (the class mixture aside).
    cfg = cfg or TeacherEvalConfig(bar="balanced")
    start = time.perf_counter()
    codec, unet, scheduler = load_latent_teacher(folder)
    heldout, _ = digits("heldout", size=IMAGE_SIZE)
    heldout_latents = codec.encode(heldout)
    reconstructions = codec.decode(heldout_latents)

    sample_start = time.perf_counter()
    samples, latents = sample_latent_digits(codec, unet, scheduler.config, cfg.n_samples, cfg.steps, cfg.seed)
    result = evaluate_samples(samples, time.perf_counter() - sample_start, cfg, image_size=IMAGE_SIZE, start=start)
    return LatentTeacherEvalResult(
        samples=result,
        vae_psnr_heldout=psnr(reconstructions, heldout),
        fd_vae_reconstruction=frechet_distance(reconstructions, heldout),
        heldout_latent_mean=heldout_latents.mean().item(),
        heldout_latent_std=heldout_latents.std().item(),
        sampled_latent_std=latents.std().item(),
        total_seconds=time.perf_counter() - start,
    )


def _extra_rows(result: LatentTeacherEvalResult) -> list[tuple[str, str]]:
    return [
        ("autoencoder: PSNR of held-out reconstructions (posterior mode)", f"{result.vae_psnr_heldout:.2f} dB"),
        ("autoencoder: FD reconstructions vs held-out (its floor)", f"{result.fd_vae_reconstruction:.3f}"),
        ("held-out latents x scaling_factor: mean / std", f"{result.heldout_latent_mean:.3f} / {result.heldout_latent_std:.3f}"),
        ("sampled latents: std", f"{result.sampled_latent_std:.3f}"),
    ]


def _training_lines(info: dict) -> list[str]:
    if not info:
        return ["- (no training_info.json in the teacher folder)"]
    cfg = {k: v for k, v in info.get("config", {}).items() if k not in ("out", "log_every")}
    vae, unet = info.get("vae", {}), info.get("unet", {})
    vae_loss = vae.get("loss_history", [{}])[-1] if vae.get("loss_history") else {}
    unet_loss = unet.get("loss_history", [{}])[-1].get("loss") if unet.get("loss_history") else None
    return [
        "- " + ", ".join(f"{k} {v}" for k, v in cfg.items()),
        f"- autoencoder: {vae.get('params')} params, {vae.get('seconds')} s; final reconstruction loss "
        f"{round(vae_loss.get('reconstruction', float('nan')), 4)}, KL {round(vae_loss.get('kl', float('nan')), 1)}; "
        f"scaling factor {round(vae.get('scaling_factor', float('nan')), 4)}"
        + (f" (reused from {vae['reused_from']})" if vae.get("reused_from") else ""),
        f"- latent UNet: {unet.get('params')} params, {unet.get('seconds')} s; final mean loss "
        f"{unet_loss if unet_loss is None else round(unet_loss, 4)}",
        f"- training latents {info.get('latents')}; total {info.get('seconds')} s on the shared 2-core development "
        f"CPU, one thread; torch {info.get('torch')}",
    ]


def evaluate_cli(folder: str, report: str | None, num_threads: int, cfg: TeacherEvalConfig | None = None) -> None:
    """Evaluate, print the table, write the page; exit non-zero when the bar is not met."""
    from pyevo.teachers.evaluate import TeacherEvalConfig, format_table, write_report

    torch.set_num_threads(num_threads)
    cfg = cfg or TeacherEvalConfig(bar="balanced")
    try:
        result = evaluate_latent_teacher(folder, cfg)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    extra = _extra_rows(result)
    print(format_table(result.samples, cfg, extra_rows=extra))
    if report:
        info_path = Path(folder) / "training_info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        write_report(
            Path(report), Path(folder), result.samples, cfg,
            title="Latent-digits teacher: quality check",
            commands=["python -m pyevo.classifier                 # digits classifier (feature extractor)",
                      "python -m pyevo.teachers.latent_digits     # train -> pyevo/assets/latent_digits_teacher/",
                      "python -m pyevo.teachers.latent_digits --evaluate"],
            training=_training_lines(info),
            evaluation=(f"Evaluation: {cfg.n_samples} DDIM samples ({cfg.steps} steps, eta 0, seed {cfg.seed}) of "
                        f"4x8x8 latents by `pyevo.sample.ddim_sample`, decoded by the autoencoder (latents / "
                        f"scaling_factor) to 1x32x32, vs the 500 held-out digits at 32x32, in the digits "
                        f"classifier's 64-d feature space (images resized to 16x16; float64). The floor is "
                        f"{cfg.n_samples} training images at 32x32 (draw seed {cfg.floor_seed}) vs the same "
                        f"held-out set."),
            extra_rows=extra,
            extra_raw={"latent": {k: v for k, v in dataclasses.asdict(result).items() if k != "samples"}},
        )
        log.info("wrote %s", report)
    if not result.samples.passed:
        raise SystemExit("error: the teacher does not meet the quality bar")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pyevo.teachers.latent_digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluate", action="store_true", help="evaluate a trained teacher instead of training")
    parser.add_argument("--teacher", default=str(LATENT_DIGITS_TEACHER_DIR), help="teacher folder to evaluate")
    parser.add_argument("--report", default="experiments/latent_digits_teacher.md",
                        help="markdown file the evaluation writes ('' to skip)")
    for field in dataclasses.fields(LatentTeacherTrainConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parse_args(argv)
    if args.evaluate:
        evaluate_cli(args.teacher, args.report or None, num_threads=args.num_threads)
        return
    cfg = LatentTeacherTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LatentTeacherTrainConfig)})
    try:
        _ints(cfg.vae_channels), _ints(cfg.unet_channels)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if cfg.vae_from and not (Path(cfg.vae_from) / "vqvae" / "config.json").is_file():
        raise SystemExit(f"error: --vae-from {cfg.vae_from}: not a latent-digits teacher folder (no vqvae/config.json)")
    train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
