"""A random-init Stable-Diffusion-v1.5-shaped teacher (runwayml/stable-diffusion-v1-5's UNet, VAE and
scheduler configs) saved as a ``StableDiffusionPipeline`` folder without a text encoder, and a
conditions file of seeded random text states that stand in for CLIP ViT-L/14's, for pyevo's
architecture-level text-conditional run.

No pretrained weights can be fetched here, so the teacher has the published shapes with random
weights: latencies, MACs and parameter counts are real figures of the architecture, sample quality
is meaningless. ``--width-divisor`` builds the same UNet with every ``block_out_channels`` divided
(2: 160,320,640,640; 4: 80,160,320,320), the text width (768) and the 8 heads per transformer kept;
at 1 it is SD-v1.5's UNet itself, and its parameter count (859.52 M) and MACs are asserted.

    python experiments/sd15/make_teacher.py --out runs/sd15/teacher_w4 --width-divisor 4 --conditions runs/sd15/conditions.safetensors
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import safetensors.torch
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

# runwayml/stable-diffusion-v1-5 unet/config.json (the same as CompVis/stable-diffusion-v1-4's): 4x64x64
# latents, block_out_channels 320,640,1280,1280, 2 resnets per block, cross-attention transformers in the
# first three down blocks, the mid block and the last three up blocks; diffusers' `attention_head_dim` 8
# here is the number of heads (head sizes 40/80/160/160); text states of CLIP ViT-L/14, 77 x 768. This is
# tests/unet_configs.py SD15_CONFIG, written out so that the experiment says what it builds.
UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

# runwayml/stable-diffusion-v1-5 vae/config.json: the KL-f8 autoencoder, 512x512 RGB <-> 4x64x64 latents,
# latents scaled by 0.18215 (diffusers' AutoencoderKL default, written explicitly).
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json: PNDM (its pipeline's default sampler),
# 1,000 steps, "scaled_linear" 0.00085 -> 0.012, steps_offset 1, clip_sample false, epsilon prediction (the key postdates
# the published file; epsilon is diffusers' default and SD-v1's parameterization). pyevo reads the
# schedule into a DDPMScheduler (the forward process it trains on) and samples with its own DDIM; the
# checks build a DDIMScheduler from the same folder, as users of this pipeline commonly do.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

PARAMS_M = 859.52        # SD-v1.5's UNet parameter count, in millions (859,520,964)
TEXT_TOKENS, TEXT_DIM = 77, 768   # CLIP ViT-L/14's text states: 77 tokens of width 768
IMAGE_SIZE = 512


def unet_config(width_divisor: int = 1) -> dict:
    """SD-v1.5's UNet config with every block width divided by ``width_divisor``; the group count stays
    32 where the widths allow it (divisors 1, 2), else the largest power of two that divides them."""
    widths = tuple(c // width_divisor for c in UNET_CONFIG["block_out_channels"])
    if any(c * width_divisor != w for c, w in zip(widths, UNET_CONFIG["block_out_channels"])):
        raise ValueError(f"width divisor {width_divisor} does not divide {UNET_CONFIG['block_out_channels']}")
    groups = 32
    while any(c % groups for c in widths):
        groups //= 2
    return {**UNET_CONFIG, "block_out_channels": widths, "norm_num_groups": groups}


def unet_inputs(unet: UNet2DConditionModel, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of one UNet call: latents, timesteps and text states (77 x 768)."""
    size = unet.config.sample_size
    return (torch.zeros(batch, unet.config.in_channels, size, size), torch.zeros(batch, dtype=torch.long),
            torch.zeros(batch, TEXT_TOKENS, unet.config.cross_attention_dim))


def make_teacher(out: Path, width_divisor: int, seed: int) -> dict:
    torch.manual_seed(seed)  # fixed seed: the same random teacher on every machine with this torch
    config = unet_config(width_divisor)
    unet = UNet2DConditionModel(**config).eval()
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    params = sum(p.numel() for p in unet.parameters())
    if width_divisor == 1:
        assert round(params / 1e6, 2) == PARAMS_M, f"{params:,} parameters, expected {PARAMS_M} M"
    from pyevo.cost import count_macs

    with torch.no_grad():
        macs = count_macs(unet, *unet_inputs(unet))
        latents = vae.encode(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).latent_dist.mean
    assert tuple(latents.shape) == (1, 4, 64, 64), f"KL-f8 latents {tuple(latents.shape)}, expected (1, 4, 64, 64)"
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=PNDMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    # The published file also says clip_sample false (a key PNDMScheduler does not take, kept for the
    # schedulers built from this config, e.g. DDIMScheduler, whose default would clip latents to [-1, 1]).
    scheduler_json = out / "scheduler" / "scheduler_config.json"
    scheduler_json.write_text(json.dumps({**json.loads(scheduler_json.read_text()), "clip_sample": False},
                                         indent=2, sort_keys=True) + "\n")
    return {"width_divisor": width_divisor, "block_out_channels": list(config["block_out_channels"]),
            "norm_num_groups": config["norm_num_groups"], "unet_params": params, "unet_macs": macs,
            "vae_params": sum(p.numel() for p in vae.parameters()), "latent_shape": list(latents.shape[1:])}


def write_conditions(path: Path, prompts: int, seed: int) -> dict:
    """Seeded random states [prompts, 77, 768] and unconditional states [1, 77, 768]: they stand in for
    CLIP ViT-L/14's encodings of prompts and of the empty prompt (no text encoder can be had here)."""
    generator = torch.Generator().manual_seed(seed + 1)
    tensors = {"encoder_hidden_states": torch.randn(prompts, TEXT_TOKENS, TEXT_DIM, generator=generator),
               "negative_encoder_hidden_states": torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator)}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, path, metadata={"source": f"torch.randn, seed {seed + 1}: random stand-ins "
                                                                    "for CLIP ViT-L/14 text states"})
    return {name: list(t.shape) for name, t in tensors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="StableDiffusionPipeline folder to write (unet/, vae/, scheduler/)")
    parser.add_argument("--width-divisor", type=int, default=1, help="divide every UNet block width by this (1: SD-v1.5)")
    parser.add_argument("--conditions", default=None, help="safetensors file of random text states to write")
    parser.add_argument("--prompts", type=int, default=8, help="number of random prompts' states in --conditions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    facts = make_teacher(Path(args.out), args.width_divisor, args.seed)
    if args.conditions:
        facts["conditions"] = {"file": args.conditions, **write_conditions(Path(args.conditions), args.prompts, args.seed)}
    print(json.dumps({"teacher": args.out, **facts}))


if __name__ == "__main__":
    main()
