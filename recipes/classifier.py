"""A small CNN digit classifier: scores generated digits (class accuracy) and supplies the feature space of the
Fréchet distance. Saved as a weights_only-loadable dict with a format header, its metadata as JSON beside it."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from fastardiff.errors import CheckpointError

from .checkpoint import atomic_torch_save, read_payload

log = logging.getLogger(__name__)

CLASSIFIER_FORMAT = "fastardiff-digit-classifier"
CLASSIFIER_VERSION = 1


class DigitClassifier(nn.Module):
    """[B, 1, 32, 32] in [-1, 1] -> logits [B, num_classes]; `features` gives the penultimate activations."""

    def __init__(self, num_classes: int = 10, channels: int = 1, feature_dim: int = 128):
        super().__init__()
        self.num_classes, self.channels, self.feature_dim = num_classes, channels, feature_dim
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),  # 2x2
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4, feature_dim), nn.ReLU(), nn.Dropout(0.2))
        self.out = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(images))

    def hparams(self) -> dict:
        return {"num_classes": self.num_classes, "channels": self.channels, "feature_dim": self.feature_dim}


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (background -1 fills the gap)."""
    B = images.shape[0]
    padded = nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    H, W = images.shape[-2:]
    return torch.stack([padded[b, :, dy[b]:dy[b] + H, dx[b]:dx[b] + W] for b in range(B)])


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum((model(images[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(images), batch))
    return correct / max(len(images), 1)


def train_classifier(split, steps: int = 1500, batch_size: int = 64, seed: int = 0, lr: float = 2e-3,
                     progress: bool = True) -> tuple[DigitClassifier, dict]:
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.time()
    bar = tqdm(range(steps), desc="classifier", disable=not progress)
    for _ in bar:
        model.train()
        idx = torch.randint(0, len(split.train_images), (batch_size,), generator=gen)
        images = random_shift(split.train_images[idx], 2, gen)
        loss = nn.functional.cross_entropy(model(images), split.train_labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    test_acc = accuracy(model, split.test_images, split.test_labels)
    meta = {"test_accuracy": test_acc, "steps": steps, "seed": seed, "train_seconds": round(time.time() - start, 1),
            "train_digits": len(split.train_images), "test_digits": len(split.test_images)}
    log.info("classifier test accuracy %.4f", test_acc)
    return model.eval(), meta


def save_classifier(path: str | Path, model: DigitClassifier, meta: dict) -> Path:
    path = Path(path)
    header = {"format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION, "hparams": model.hparams(), "meta": meta}
    atomic_torch_save({**header, "state_dict": model.state_dict()}, path)
    path.with_suffix(".json").write_text(json.dumps(header, indent=2, sort_keys=True))
    return path


def load_classifier(path: str | Path) -> DigitClassifier:
    payload = read_payload(path, expected_format=CLASSIFIER_FORMAT)
    model = DigitClassifier(**payload["hparams"])
    try:
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"'{path}': classifier weights do not match its header ({str(err)[:120]})") from None
    model.meta = payload.get("meta", {})
    return model.eval().requires_grad_(False)
