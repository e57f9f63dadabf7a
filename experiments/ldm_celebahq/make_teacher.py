"""A random-init LDM CelebA-HQ-256 teacher (CompVis/ldm-celebahq-256's UNet, VQ-f4 autoencoder and
DDIM scheduler configs) saved as an ``LDMPipeline`` folder, and an offline 256x256 image folder,
for pyevo's architecture-level latent run.

No pretrained weights can be fetched here, so the teacher has the published shapes with random
weights: latencies, MACs and parameter counts are real, sample quality is meaningless.

    python experiments/ldm_celebahq/make_teacher.py --out runs/ldm_celebahq/teacher --images runs/ldm_celebahq/images
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel
from PIL import Image

# CompVis/ldm-celebahq-256 unet/config.json. Confirmed field by field against a diffusers-saved
# copy of that repo's unet/config.json (snapshot 03978f2) and against the original training config
# (latent-diffusion configs/latent-diffusion/celebahq-ldm-vq-4.yaml: model_channels 224,
# channel_mult 1,2,3,4, num_res_blocks 2, attention at downsampling 2/4/8 = latent 32/16/8,
# num_head_channels 32 = diffusers' attention_head_dim 32, channels per head).
UNET_CONFIG = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896),
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=1,
    act_fn="silu",
    attention_head_dim=32,
    norm_num_groups=32,
    norm_eps=1e-5,
    resnet_time_scale_shift="default",
    add_attention=True,
)

# CompVis/ldm-celebahq-256 vqvae/config.json (the hub page of main), plus vq_embed_dim = 3, which
# is what diffusers takes for the published null (vq_embed_dim defaults to latent_channels). The
# original: embed_dim 3, n_embed 8192, ch 128, ch_mult 1,2,4, 2 res blocks, 256x256 images -> an
# f4 latent of 3x64x64.
#
# scaling_factor: the published main config has no such key, so diffusers fills in VQModel's
# default 0.18215 (LDMPipeline then divides latents by it before decoding). The LDM CelebA-HQ model
# was trained with scale_factor 1.0 (LatentDiffusion's default; celebahq-ldm-vq-4.yaml sets none),
# and an open pull request on the hub repo (refs/pr/5) sets scaling_factor 1.0. Written explicitly
# here as 1.0, the training's value, so that the folder says what it means.
VQVAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(128, 256, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=3,
    sample_size=256,
    num_vq_embeddings=8192,
    norm_num_groups=32,
    vq_embed_dim=3,
    scaling_factor=1.0,
)

# CompVis/ldm-celebahq-256 scheduler/scheduler_config.json: DDIM over 1,000 steps, LDM's "linear"
# schedule linear_start 0.0015 -> linear_end 0.0195 in sqrt space (diffusers' "scaled_linear"),
# no clipping (latents are not in [-1, 1]), epsilon prediction (LDM's parameterization "eps").
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0015,
    beta_end=0.0195,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="epsilon",
)

PARAMS_M = 274.1  # the published UNet's parameter count, in millions (shared/FACTS.md)
GMACS = 101.2     # its batch-1 MACs with attention counted (shared/FACTS.md)


def make_teacher(out: Path, seed: int) -> dict:
    torch.manual_seed(seed)  # fixed seed: the same random teacher on every machine with this torch
    unet = UNet2DModel(**UNET_CONFIG).eval()
    vqvae = VQModel(**VQVAE_CONFIG).eval()
    params = sum(p.numel() for p in unet.parameters())
    assert round(params / 1e6, 1) == PARAMS_M, f"{params:,} parameters, expected {PARAMS_M} M"
    from pyevo.cost import count_macs

    with torch.no_grad():
        macs = count_macs(unet, torch.zeros(1, 3, 64, 64), torch.zeros(1, dtype=torch.long))
        assert round(macs / 1e9, 1) == GMACS, f"{macs:,} MACs, expected {GMACS} G"
        latents = vqvae.encode(torch.zeros(1, 3, 256, 256)).latents
    assert tuple(latents.shape) == (1, 3, 64, 64), f"VQ-f4 latents {tuple(latents.shape)}, expected (1, 3, 64, 64)"
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG)).save_pretrained(out)
    return {"unet_params": params, "unet_macs": macs, "vqvae_params": sum(p.numel() for p in vqvae.parameters()),
            "latent_shape": list(latents.shape[1:])}


SIZE = 256  # the VQ-f4 autoencoder's image size
CROPS_PER_PHOTO = 20  # 40 images: pyevo holds out a tenth (4) for NSR


def image_source(seed: int) -> tuple[str, list[np.ndarray]]:
    """256x256 RGB images that can be had offline: random crops (seeded) of scikit-learn's two sample
    photos, or, where those cannot be read, seeded synthetic images (smooth random colour fields)."""
    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images()
    except (ImportError, OSError):
        images = []
        for _ in range(2 * CROPS_PER_PHOTO):
            coarse = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
            images.append(np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.BICUBIC)))
        return f"synthetic: {len(images)} {SIZE}x{SIZE} bicubic-upsampled 8x8 random colour fields (seed {seed})", images
    crops = []
    for photo in photos.images:  # 427x640 RGB each: china.jpg, flower.jpg
        for _ in range(CROPS_PER_PHOTO):
            top = int(rng.integers(0, photo.shape[0] - SIZE + 1))
            left = int(rng.integers(0, photo.shape[1] - SIZE + 1))
            crops.append(np.ascontiguousarray(photo[top:top + SIZE, left:left + SIZE]))
    names = ", ".join(Path(f).name for f in photos.filenames)
    return (f"sklearn.datasets.load_sample_images: {len(crops)} {SIZE}x{SIZE} RGB crops of {names} at random "
            f"(possibly overlapping) positions, {CROPS_PER_PHOTO} per photo, seed {seed}", crops)


def write_images(folder: Path, seed: int) -> str:
    name, images = image_source(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    (folder / "SOURCE.txt").write_text(name + "\n")
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="LDMPipeline folder to write (unet/, vqvae/, scheduler/)")
    parser.add_argument("--images", required=True, help="image folder to write for --data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    facts = make_teacher(Path(args.out), args.seed)
    source = write_images(Path(args.images), args.seed)
    print(json.dumps({"teacher": args.out, **facts, "images": args.images, "image_source": source}))


if __name__ == "__main__":
    main()
