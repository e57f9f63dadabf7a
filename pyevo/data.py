"""Image data for pyevo: the built-in digits set and arbitrary image folders.

Every image pyevo hands to a model is float32, channels-first, scaled to [-1, 1].

The digits set is scikit-learn's ``load_digits`` (1,797 real 8x8 scans, values 0..16), upsampled
to 16x16 (or any other size: ``digits(split, size=32)`` is the latent-digits teacher's image size).
It is split once, with a fixed seed and stratified by class, into 1,297 training images
and 500 held-out images (50 per class, up to rounding). The teacher and the classifier train on
the training split only; Fréchet distances are measured against the held-out split.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

DIGITS_SIZE = 16
# Image sizes of the built-in teachers' digits (pixel: 16, latent-digits: 32); the digits classifier
# and feature space take either, resized to 16x16.
DIGITS_IMAGE_SIZES = (16, 32)
DIGITS_HELDOUT = 500
DIGITS_SPLIT_SEED = 0
DIGITS_SPLITS = ("train", "heldout", "all")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1] (for saving and plotting)."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


@lru_cache(maxsize=4)
def _digits_all(size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """All 1,797 digits at ``size`` x ``size`` in [-1, 1], their labels, and the held-out mask (cached)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    raw = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)  # (N, 8, 8) in [0, 1]
    # bilinear + antialias: antialias is a no-op when upsampling but keeps the call correct for
    # any target size below 8.
    resized = F.interpolate(
        raw[:, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    images = (resized.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))

    index = np.arange(len(labels))
    _, heldout_index = train_test_split(
        index, test_size=DIGITS_HELDOUT, stratify=bunch.target, random_state=DIGITS_SPLIT_SEED
    )
    heldout_mask = np.zeros(len(labels), dtype=bool)
    heldout_mask[heldout_index] = True
    return images, labels, heldout_mask


def digits(split: Literal["train", "heldout", "all"] = "train", size: int = DIGITS_SIZE
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits images (N, 1, size, size) float32 in [-1, 1] and labels (N,) int64 of one split.

    ``train`` has 1,297 images, ``heldout`` 500, ``all`` 1,797 (in scikit-learn's order). The split
    is fixed: the same images land in the same split on every call and machine.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {', '.join(DIGITS_SPLITS)}")
    if size < 1:
        raise ValueError(f"digits size must be positive, got {size}")
    images, labels, heldout_mask = _digits_all(size)
    if split == "all":
        keep = np.ones_like(heldout_mask)
    else:
        keep = heldout_mask if split == "heldout" else ~heldout_mask
    keep_t = torch.from_numpy(keep)
    return images[keep_t].clone(), labels[keep_t].clone()


def is_digits_shape(shape) -> bool:
    """Whether one image of ``shape`` (C, H, W) is a digit as the built-in teachers draw them."""
    return tuple(shape) in {(1, size, size) for size in DIGITS_IMAGE_SIZES}


def at_digits_size(images: torch.Tensor) -> torch.Tensor:
    """Grey [-1, 1] images (N, 1, S, S) at the classifier's 16x16 (antialiased bilinear), for the
    digits feature space and classifier; 16x16 images pass through unchanged."""
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"digits must have shape (N, 1, S, S), got {tuple(images.shape)}")
    if images.shape[2] == DIGITS_SIZE:
        return images
    return F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", antialias=True,
                         align_corners=False).clamp(-1.0, 1.0)


class UnreadableImage(ValueError):
    """An image file PIL cannot open or decode (truncated, corrupt, not an image)."""


class ImageFolder(Dataset):
    """Every image file under ``root`` (recursively, sorted by path) as a [-1, 1] tensor.

    Images are converted to grayscale (``channels=1``) or RGB (``channels=3``), centre-cropped to a
    square (the shorter side) when they are not square, and resized to ``size`` x ``size`` with
    bicubic filtering (PIL applies antialiasing when shrinking). Items are tensors (channels, size,
    size). A file that cannot be read raises :class:`UnreadableImage` naming it; :meth:`load` reads
    them all, skipping such files if asked, and logs how many were converted, cropped, resized.

    With ``labelled=True`` every image must sit in a class sub-folder of ``root`` (one level
    down, as torchvision's ``ImageFolder`` lays it out), and ``labels`` holds one label per image:
    the sub-folder's name when every name is a non-negative integer (``3/`` is class 3), else the
    sub-folder's index in sorted order (``class_names`` lists them).

    With ``captioned=True`` (text-conditional teachers) every image ``name.png`` must have its caption
    beside it in ``name.txt`` (UTF-8; surrounding whitespace stripped); :meth:`captions_of` gives the
    captions of the images :meth:`load` read.
    """

    def __init__(self, root: str | Path, size: int, channels: int = 3, labelled: bool = False,
                 captioned: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if size < 1:
            raise ValueError(f"image size must be positive, got {size}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} does not exist or is not a directory")
        self.paths = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.paths:
            raise ValueError(
                f"image folder {str(self.root)!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})"
            )
        self.size = size
        self.channels = channels
        self.labels: torch.Tensor | None = None
        self.class_names: list[str] = []
        if labelled:
            self._read_labels()
        self.captions: dict[Path, str] = self._read_captions() if captioned else {}
        self.read_paths: list[Path] = []  # the images the last load() returned, in order
        log.info("image folder %s: %d images, %dx%d, %d channel(s)", self.root, len(self.paths), size, size, channels)

    def _read_labels(self) -> None:
        loose = [p for p in self.paths if p.parent == self.root]
        if loose:
            raise ValueError(f"image folder {str(self.root)!r} has images outside class sub-folders "
                             f"(e.g. {loose[0].name}); a class-conditional teacher needs one sub-folder per class")
        self.class_names = sorted({p.relative_to(self.root).parts[0] for p in self.paths})
        numeric = all(name.isdigit() for name in self.class_names)
        label_of = {name: int(name) if numeric else index for index, name in enumerate(self.class_names)}
        self.labels = torch.tensor([label_of[p.relative_to(self.root).parts[0]] for p in self.paths], dtype=torch.long)

    def _read_captions(self) -> dict[Path, str]:
        missing = [p for p in self.paths if not p.with_suffix(".txt").is_file()]
        if missing:
            raise ValueError(f"image folder {str(self.root)!r}: {len(missing)} of its {len(self.paths)} images have "
                             f"no caption (e.g. {missing[0].relative_to(self.root)} has no "
                             f"{missing[0].with_suffix('.txt').name} beside it)")
        captions = {}
        for path in self.paths:
            try:
                captions[path] = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as error:
                raise ValueError(f"caption {path.with_suffix('.txt')} cannot be read as UTF-8 text: "
                                 f"{' '.join(str(error).split())}") from None
        return captions

    def captions_of(self, paths: list[Path]) -> list[str]:
        """The captions of ``paths`` (e.g. :attr:`read_paths`)."""
        return [self.captions[path] for path in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._read(self.paths[index])[0]

    def load(self, skip_unreadable: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All images (N, C, size, size) and their labels (None unless labelled). An unreadable file
        raises :class:`UnreadableImage`, or with ``skip_unreadable`` is left out (and counted)."""
        images, keep, skipped = [], [], []
        changes = {"converted": 0, "cropped": 0, "resized": 0}
        for index, path in enumerate(self.paths):
            try:
                image, done = self._read(path)
            except UnreadableImage as error:
                if not skip_unreadable:
                    raise
                skipped.append(path)
                log.warning("skipped: %s", error)
                continue
            images.append(image)
            keep.append(index)
            for key in done:
                changes[key] += 1
        if not images:
            raise ValueError(f"image folder {str(self.root)!r}: none of its {len(self.paths)} images could be read")
        log.info("image folder %s: %d images read (%s)%s", self.root, len(images),
                 ", ".join(f"{count} {key}" for key, count in changes.items()),
                 f", {len(skipped)} unreadable skipped" if skipped else "")
        labels = None if self.labels is None else self.labels[torch.tensor(keep, dtype=torch.long)]
        self.read_paths = [self.paths[index] for index in keep]
        return torch.stack(images), labels

    def _read(self, path: Path) -> tuple[torch.Tensor, list[str]]:
        """One image as a tensor, and what was done to it (converted, cropped, resized)."""
        done = []
        try:
            with Image.open(path) as image:
                mode = "L" if self.channels == 1 else "RGB"
                if image.mode != mode:
                    image, _ = image.convert(mode), done.append("converted")
                if image.width != image.height:
                    side = min(image.width, image.height)
                    left, top = (image.width - side) // 2, (image.height - side) // 2
                    image, _ = image.crop((left, top, left + side, top + side)), done.append("cropped")
                if image.size != (self.size, self.size):
                    image, _ = image.resize((self.size, self.size), Image.Resampling.BICUBIC), done.append("resized")
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for truncated / corrupt files
            reason = " ".join(str(error).split()) or type(error).__name__
            raise UnreadableImage(f"cannot read image {path}: {reason}") from None
        if array.ndim == 2:
            array = array[None]
        else:
            array = array.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(array)) * 2.0 - 1.0, done
