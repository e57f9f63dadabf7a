"""A small CNN classifier for 16x16 digits, used as pyevo's feature extractor.

Its 64-d penultimate embedding feeds the Fréchet distance (``pyevo.metrics``); its predictions
give class coverage and sample accuracy. Trained on the digits training split by

    python -m pyevo.classifier

which writes ``pyevo/assets/digits_classifier/`` (``model.safetensors`` + ``config.json``) and
logs the held-out accuracy. Training is seeded and uses small random shifts (up to 2 px) as its
only augmentation: flips and rotations would turn some digits into others.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pyevo.data import digits

log = logging.getLogger(__name__)

DIGITS_CLASSIFIER_DIR = Path(__file__).resolve().parent / "assets" / "digits_classifier"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ClassifierConfig:
    """Architecture: two conv stages (16x16 -> 8x8 -> 4x4), a feature layer, a linear head."""

    image_size: int = 16
    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, int] = (32, 64)
    feature_dim: int = 64
    dropout: float = 0.3


class DigitsClassifier(nn.Module):
    """CNN on [-1, 1] images (N, 1, 16, 16). ``features`` is the 64-d embedding before the head."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        c1, c2 = config.widths

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(stage(config.in_channels, c1), stage(c1, c2))
        spatial = config.image_size // 4
        self.embed = nn.Linear(c2 * spatial * spatial, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        # Pre-activation embedding: keeps the negative half, so the features are closer to
        # Gaussian and their covariance full rank, which the Fréchet distance assumes.
        return self.embed(self.body(images).flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.features(images))))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Predicted class per image (eval mode, batched)."""
        was_training = self.training
        self.eval()
        preds = torch.cat([self(chunk).argmax(1) for chunk in images.split(batch_size)])
        self.train(was_training)
        return preds


def save_classifier(model: DigitsClassifier, folder: Path, extra: dict | None = None) -> None:
    """Write weights and config atomically (temporary folder, then rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    config = {"config": dataclasses.asdict(model.config), **(extra or {})}
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    for path in [tmp, *tmp.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_digits_classifier(folder: str | Path = DIGITS_CLASSIFIER_DIR) -> DigitsClassifier:
    """The shipped digits classifier, in eval mode with gradients off."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a digits classifier folder: need {WEIGHTS_FILE} and {CONFIG_FILE}")
    fields = json.loads((folder / CONFIG_FILE).read_text())["config"]
    fields["widths"] = tuple(fields["widths"])
    model = DigitsClassifier(ClassifierConfig(**fields))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    model.eval().requires_grad_(False)
    return model


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model.predict(images) == labels).float().mean().item()


@dataclass
class ClassifierTrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 2
    seed: int = 0
    num_threads: int = 2
    out: str = str(DIGITS_CLASSIFIER_DIR)


def _random_shift(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with background (-1)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train(cfg: ClassifierTrainConfig) -> tuple[DigitsClassifier, float]:
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels = digits("train")
    heldout_images, heldout_labels = digits("heldout")

    model = DigitsClassifier()
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    start = time.perf_counter()
    for epoch in tqdm(range(cfg.epochs), desc="classifier", mininterval=2.0):
        model.train()
        order = torch.randperm(len(images), generator=gen)
        total = 0.0
        for batch in order.split(cfg.batch_size):
            x = _random_shift(images[batch], cfg.max_shift, gen)
            loss = F.cross_entropy(model(x), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(batch)
        if (epoch + 1) % 10 == 0:
            log.info("epoch %d  loss %.4f  held-out accuracy %.4f", epoch + 1, total / len(images),
                     accuracy(model, heldout_images, heldout_labels))
    model.eval().requires_grad_(False)
    heldout_acc = accuracy(model, heldout_images, heldout_labels)
    seconds = time.perf_counter() - start
    save_classifier(model, Path(cfg.out), extra={
        "training": dataclasses.asdict(cfg), "heldout_accuracy": heldout_acc, "seconds": round(seconds, 1),
    })
    log.info("held-out accuracy %.4f (%d images); wrote %s after %.0f s", heldout_acc, len(heldout_labels), cfg.out, seconds)
    return model, heldout_acc


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m pyevo.classifier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(ClassifierTrainConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    train(ClassifierTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClassifierTrainConfig)}))


if __name__ == "__main__":
    main(sys.argv[1:])
