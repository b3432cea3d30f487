"""PNG output: a grid for a batch and single images, written all-or-nothing.

`check_destination` refuses an output path that cannot be written before any work starts (it probes the
directory with an unnamed temporary file, which also catches read-only file systems, where permission bits
say nothing for root). `StagedOutputs` writes every output of a run into a hidden staging directory beside
its destination and renames them all into place at `commit()`; a failure anywhere (or an exception before
the commit) leaves neither partial files nor the directories it created.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fastardiff.errors import OutputError

from .atomic import missing_dirs, replace_keeping_backup
from .files import check_write

STAGE_PREFIX = ".fastardiff-stage-"


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


def safe_name(name: str) -> str:
    """A file-name-safe form of a class name (no separators, no leading dot)."""
    cleaned = re.sub(r"[^A-Za-z0-9_+-]+", "_", str(name)).strip("_")
    return cleaned[:80] or "image"


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


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_destination(path: str | Path, option: str, is_dir: bool = False) -> Path:
    """Raise OutputError unless `path` (a file, or a directory with is_dir) can be written; writes nothing."""
    path = Path(path)
    if str(path).strip() == "" or "\x00" in str(path):
        raise OutputError(f"{option} '{path}' is not a usable path")
    if path.exists() or path.is_symlink():
        if is_dir and not path.is_dir():
            raise OutputError(f"{option} '{path}' exists and is not a directory; pass a directory path")
        if not is_dir and path.is_dir():
            raise OutputError(f"{option} '{path}' is a directory; pass a file path")
        if not is_dir and not path.is_file():
            raise OutputError(f"{option} '{path}' exists and is not a regular file; choose another path")
    directory = path if is_dir else path.parent
    base = _existing_ancestor(directory)
    if not base.is_dir():
        raise OutputError(f"{option} '{path}': '{base}' is a file, so the directory cannot be created; "
                          "choose another path")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise OutputError(f"{option} '{path}': directory '{base}' is not writable ({err.strerror}); "
                          "choose a writable location") from None
    return path


class StagedOutputs:
    """All-or-nothing output files. `path_for(final)` gives the staging path to write `final` to; `commit()`
    renames every staged file onto its destination (replaced files are restored if a rename fails); leaving the
    `with` block without a commit, or a failed commit, removes the staging dirs and the directories created for
    them."""

    def __init__(self):
        self._stages: dict[Path, Path] = {}      # destination dir -> its staging dir
        self._files: list[tuple[Path, Path]] = []  # (staged, final)
        self._finals: set[Path] = set()          # absolute destinations so far (a run may stage thousands)
        self._created: list[Path] = []           # directories made for the outputs, outermost first
        self.committed = False

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def _stage_dir(self, directory: Path) -> Path:
        key = Path(os.path.abspath(directory))
        if key not in self._stages:
            try:
                for d in reversed(missing_dirs(key)):
                    d.mkdir()
                    self._created.append(d)
                self._stages[key] = Path(tempfile.mkdtemp(dir=key, prefix=STAGE_PREFIX))
            except OSError as err:
                raise OutputError(f"cannot write into '{directory}' ({err.strerror}); choose a writable "
                                  "location") from None
        return self._stages[key]

    def path_for(self, final: str | Path) -> Path:
        final = Path(final)
        check_write(final)                       # never an input of the running command (runtime/files.py)
        absolute = Path(os.path.abspath(final))
        if absolute in self._finals:
            raise OutputError(f"two outputs of this run would both be written to '{final}'; give them "
                              "different paths")
        staged = self._stage_dir(final.parent) / f"{len(self._files):06d}-{final.name}"
        self._files.append((staged, final))
        self._finals.add(absolute)
        return staged

    def commit(self) -> list[Path]:
        """Rename every staged file into place; on any failure undo the renames done so far."""
        done: list[tuple[Path, Path, Path | None]] = []
        try:
            for i, (staged, final) in enumerate(self._files):
                if not staged.exists():
                    raise OutputError(f"output '{final}' was never written; nothing was written")
                backup = replace_keeping_backup(staged, final, staged.parent / f".replaced-{i:06d}")
                done.append((staged, final, backup))
        except BaseException as err:
            for staged, final, backup in reversed(done):
                try:
                    os.replace(final, staged)
                    if backup is not None:
                        os.replace(backup, final)
                except OSError:
                    pass
            self.abort()
            if isinstance(err, OSError):
                raise OutputError(f"could not write '{getattr(err, 'filename', '') or ''}' ({err.strerror}); "
                                  "nothing was written") from None
            raise
        self.committed = True
        self._cleanup(remove_created=False)
        return [final for _, final in self._files]

    def abort(self) -> None:
        self._cleanup(remove_created=True)

    def _cleanup(self, remove_created: bool) -> None:
        for stage in self._stages.values():
            shutil.rmtree(stage, ignore_errors=True)
        self._stages.clear()
        if remove_created:
            for d in reversed(self._created):
                try:
                    d.rmdir()
                except OSError:
                    pass
            self._created.clear()


class StreamedImages:
    """A run's images written as generate() decodes them (its `on_images`): each single image goes into `staged`
    at once; of the grid only the 8-bit pixels are kept until `finish()` writes it. A run of thousands of images
    never holds them all as float arrays."""

    def __init__(self, staged: StagedOutputs, out: str | Path | None, out_dir: str | Path | None,
                 names: list[str] | None = None):
        self.staged, self.out, self.out_dir = staged, out, out_dir
        self.names = [safe_name(n) for n in names] if names else None     # None: 0000, 0001, ...
        self._grid: list[np.ndarray] | None = [] if out is not None else None
        self.paths: list[Path] = []                                        # destinations: grid first, then singles

    def add(self, images: np.ndarray, first: int) -> None:
        pixels = to_uint8(images)
        if self.out_dir is not None:
            for i, img in enumerate(pixels, first):
                name = self.names[i] if self.names else f"{i:04d}"
                path = Path(self.out_dir) / f"{name}.png"
                _pil(img).save(self.staged.path_for(path), format="PNG")
                self.paths.append(path)
        if self._grid is not None:
            self._grid.append(pixels)

    def finish(self) -> None:
        if self._grid is not None:
            _pil(make_grid(np.concatenate(self._grid))).save(self.staged.path_for(self.out), format="PNG")
            self.paths.insert(0, Path(self.out))


def save_images(images: np.ndarray, out: str | Path | None = None, out_dir: str | Path | None = None,
                names: list[str] | None = None, staged: StagedOutputs | None = None) -> list[Path]:
    """Write the grid to `out` and/or one PNG per image into `out_dir`.

    With `staged`, every file is encoded into its staging path (renamed into place by `staged.commit()`,
    together with the run's other outputs). Without it, all files are encoded to temporary names first and
    renamed only when every one succeeded, so a failure leaves no partial image behind."""
    if staged is not None:
        written = StreamedImages(staged, out, out_dir, names)
        written.add(images, 0)
        written.finish()
        return written.paths
    pixels = to_uint8(images)
    names = [safe_name(n) for n in names] if names else [f"{i:04d}" for i in range(len(pixels))]
    jobs = []
    if out is not None:
        jobs.append((lambda: make_grid(pixels), Path(out)))
    if out_dir is not None:
        jobs += [((lambda img=img: img), Path(out_dir) / f"{name}.png") for img, name in zip(pixels, names)]
    temps = []
    try:
        for array, path in jobs:
            temps.append((_encode_to_temp(array(), path), path))
    except BaseException:
        for tmp, _ in temps:
            os.unlink(tmp)
        raise
    for tmp, path in temps:
        os.replace(tmp, path)
    return [path for _, path in temps]
