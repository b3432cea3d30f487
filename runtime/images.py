"""PNG output: a grid for a batch and single images, written atomically (temp file, then rename)."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8."""
    x = np.clip((images + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """[B, H, W, C] uint8 -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image."""
    b, h, w, c = images.shape
    cols = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _encode_to_temp(array: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _pil(array).save(tmp, format="PNG")
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def save_images(images: np.ndarray, out: str | Path | None = None, out_dir: str | Path | None = None,
                names: list[str] | None = None) -> list[Path]:
    """Write the grid to `out` and/or one PNG per image into `out_dir`. All files are encoded to temporary
    names first and renamed only when every one succeeded, so a failure leaves no partial image behind."""
    pixels = to_uint8(images)
    jobs = []
    if out is not None:
        jobs.append((make_grid(pixels), Path(out)))
    if out_dir is not None:
        names = names or [f"{i:04d}" for i in range(len(pixels))]
        jobs += [(img, Path(out_dir) / f"{name}.png") for img, name in zip(pixels, names)]
    temps = []
    try:
        for array, path in jobs:
            temps.append((_encode_to_temp(array, path), path))
    except BaseException:
        for tmp, _ in temps:
            os.unlink(tmp)
        raise
    for tmp, path in temps:
        os.replace(tmp, path)
    return [path for _, path in temps]
