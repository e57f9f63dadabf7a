"""A random-init DDPM-CIFAR10 teacher (google/ddpm-cifar10-32's UNet and scheduler configs) and an
offline image folder, for pyevo's architecture-level run.

No pretrained weights can be fetched here, so the teacher has the published shapes with random
weights: latencies, MACs and parameter counts are real, sample quality is meaningless.

    python experiments/ddpm_cifar10/make_teacher.py --out runs/ddpm_cifar10/teacher --images runs/ddpm_cifar10/images
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

# google/ddpm-cifar10-32 unet/config.json, field by field. Up blocks run from the lowest resolution
# up, so the 16x16 attention of down_blocks.1 is mirrored at up_blocks.2 (attention "in down 1 /
# up 2"; the same config as tests/unet_configs.py). attention_head_dim None means one head of all
# 256 channels. The published config has no dropout key (the original DDPM trained with 0.1);
# diffusers' default 0.0 is what loading it gives, and only inference-time shapes matter here.
UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    freq_shift=1,
    flip_sin_to_cos=False,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=0,
    downsample_type="conv",
    upsample_type="conv",
    dropout=0.0,
    act_fn="silu",
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
    resnet_time_scale_shift="default",
    add_attention=True,
)

# google/ddpm-cifar10-32 scheduler/scheduler_config.json: 1,000 linear betas 1e-4 -> 0.02,
# epsilon prediction, fixed_large variance, clipped samples.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    variance_type="fixed_large",
    clip_sample=True,
    prediction_type="epsilon",
)

PARAMS_M = 35.75  # the published model's parameter count, in millions (shared/FACTS.md)


def make_teacher(out: Path, seed: int) -> int:
    torch.manual_seed(seed)  # fixed seed: the same random teacher on every machine with this torch
    unet = UNet2DModel(**UNET_CONFIG).eval()
    params = sum(p.numel() for p in unet.parameters())
    assert round(params / 1e6, 2) == PARAMS_M, f"{params:,} parameters, expected {PARAMS_M} M"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**SCHEDULER_CONFIG)).save_pretrained(out)
    return params


CROP = 32  # the teacher's sample size
CROPS_PER_IMAGE = 100


def image_source(seed: int) -> tuple[str, list[np.ndarray]]:
    """Real images that ship offline, in this order of preference: skimage's LFW subset (200 25x25
    grey faces); 32x32 crops of scikit-learn's two sample photos (RGB); scikit-learn's digits."""
    try:
        from skimage.data import lfw_subset
    except ImportError:
        pass
    else:
        faces = lfw_subset()  # (200, 25, 25) float in [0, 1]
        return ("skimage.data.lfw_subset (200 25x25 grey faces)",
                [np.uint8(np.clip(f, 0, 1) * 255 + 0.5) for f in faces])
    try:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images()
    except (ImportError, OSError):
        from sklearn.datasets import load_digits

        digits = load_digits().images  # 8x8, values 0..16
        return "sklearn.datasets.load_digits (1,797 8x8 grey digits)", [np.uint8(d * 255 / 16 + 0.5) for d in digits]
    # Non-overlapping grid cells, CROPS_PER_IMAGE drawn per photo with a fixed seed, so that the
    # set mixes both photos' textures (china.jpg: buildings, sky; flower.jpg: petals, leaves).
    rng = np.random.default_rng(seed)
    crops = []
    for photo in photos.images:
        rows, cols = photo.shape[0] // CROP, photo.shape[1] // CROP
        for cell in rng.choice(rows * cols, size=CROPS_PER_IMAGE, replace=False):
            r, c = divmod(int(cell), cols)
            crops.append(np.ascontiguousarray(photo[r * CROP:(r + 1) * CROP, c * CROP:(c + 1) * CROP]))
    names = ", ".join(Path(f).name for f in photos.filenames)
    return (f"sklearn.datasets.load_sample_images: {len(crops)} {CROP}x{CROP} RGB crops of {names} "
            "(skimage is not installed in the venv)", crops)


def write_images(folder: Path, seed: int) -> str:
    name, images = image_source(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        # Saved at their own size: pyevo's ImageFolder resizes to 32x32 and converts to RGB.
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    (folder / "SOURCE.txt").write_text(name + "\n")
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="pipeline folder to write (unet/, scheduler/)")
    parser.add_argument("--images", required=True, help="image folder to write for --data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = make_teacher(Path(args.out), args.seed)
    source = write_images(Path(args.images), args.seed)
    print(json.dumps({"teacher": args.out, "params": params, "images": args.images, "image_source": source}))


if __name__ == "__main__":
    main()
