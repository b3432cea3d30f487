"""One rename primitive for outputs that replace older ones (engine dirs, staged images and statistics)."""
from __future__ import annotations

import os
from pathlib import Path


def replace_keeping_backup(src: Path, dst: Path, backup: Path) -> Path | None:
    """Rename src onto dst; an existing dst is first moved to `backup` (returned, else None) and moved back if
    the rename fails, so dst is never lost. The caller removes or restores the backup afterwards."""
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
