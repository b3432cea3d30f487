"""One rename primitive for outputs that replace older ones (engine dirs, staged images and statistics), and the
clean-up of output directories a failed command created."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def replace_keeping_backup(src: Path, dst: Path, backup: Path) -> Path | None:
    """Rename src onto dst; an existing dst is first moved to `backup` (returned, else None) and moved back if
    the rename fails, so dst is never lost. The caller removes or restores the backup afterwards. dst must not be
    an input of the running command (runtime/files.py check_write: a directory must not hold one)."""
    from .files import check_write

    check_write(dst, is_dir=Path(src).is_dir())
    moved = None
    if dst.exists():
        os.replace(dst, backup)
        moved = backup
    try:
        os.replace(src, dst)
    except BaseException:
        if moved is not None:
            os.replace(moved, dst)
        raise
    return moved


def missing_dirs(path: str | Path) -> list[Path]:
    """The directories of `path` (itself included) that do not exist yet, deepest first."""
    missing = []
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


@contextmanager
def created_dirs_removed_on_failure(path: str | Path):
    """Directories of `path` that a command creates are removed again (while empty) when it fails, so a
    refused input leaves no empty output directories behind; whatever was written into them is kept."""
    created = missing_dirs(path)
    try:
        yield
    except BaseException:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                pass
        raise
