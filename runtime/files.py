"""The files a command reads and the files it writes, kept apart.

`regular_file` is how every input file is checked before it is opened: one `os.stat` (which never opens the file,
so a FIFO, a socket or a device cannot block or be drained), then a refusal naming the path unless it is a regular
file. `RunInputs` is the set of files a command reads (checkpoint, manifest, engine files, plan cache entries ...),
known by resolved path and by (device, inode) identity, so a hard link or a symlink to an input is recognised too;
`refuse_output` turns an output that would replace one of them (or an output directory that would swallow one)
into one error before any work. While a command runs its inputs are also `protected()`: the write primitives
(runtime/images.py StagedOutputs, runtime/stats.py write_text_atomic, the checkpoint writer) call `check_write`,
so an output that no early check foresaw still cannot replace an input.
"""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

from fastardiff.errors import FastardiffError, OutputError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


class InputFileError(FastardiffError):
    """An input path that is missing or is not a regular file."""


def file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(path: str | Path, what: str, fix: str = "pass a regular file") -> Path:
    """`path` if it names a regular file (through symlinks); else InputFileError naming `what`, the kind of file it
    is and `fix`. Never opens the file."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputFileError(f"{what} '{path}' does not exist; {fix}") from None
    except OSError as err:
        raise InputFileError(f"cannot read {what} '{path}' ({err.strerror}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(f"{what} '{path}' is {file_kind(st.st_mode)}, not a regular file; {fix}")
    return path


def _identity(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.relative_to(directory)
        return True
    except ValueError:
        return False


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter messages), else absolute."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


class RunInputs:
    """The files one command reads: `add(path, what)`; `refuse_output(path, option)` raises OutputError if writing
    `path` would replace one of them (same resolved path or same file), and with `is_dir` (a directory the command
    replaces or fills) if one of them lies inside it."""

    def __init__(self):
        self._paths: dict[Path, str] = {}          # resolved path -> what it is
        self._ids: dict[tuple, Path] = {}          # (st_dev, st_ino) -> resolved path

    def add(self, path: str | Path | None, what: str) -> "RunInputs":
        if path is None:
            return self
        resolved = Path(os.path.realpath(path))
        self._paths.setdefault(resolved, what)
        ident = _identity(resolved)
        if ident is not None:
            self._ids.setdefault(ident, resolved)
        return self

    def add_dir_files(self, directory: str | Path, names, what: str) -> "RunInputs":
        for name in names:
            self.add(Path(directory) / name, what)
        return self

    def __len__(self) -> int:
        return len(self._paths)

    def clash(self, path: str | Path, is_dir: bool = False) -> tuple[Path, str, bool] | None:
        """(the input, what it is, whether it lies inside `path`) that writing `path` would replace, or None."""
        resolved = Path(os.path.realpath(path))
        if resolved in self._paths:
            return resolved, self._paths[resolved], False
        ident = _identity(resolved)
        if ident is not None and ident in self._ids:
            same = self._ids[ident]
            return same, self._paths[same], False
        if is_dir:
            for p, what in self._paths.items():
                if _inside(p, resolved):
                    return p, what, True
        return None

    def refuse_output(self, path: str | Path, option: str, is_dir: bool = False) -> None:
        found = self.clash(path, is_dir)
        if found is None:
            return
        where, what, inside = found
        where = _shown(where)
        if inside:
            raise OutputError(f"{option} '{path}' contains {what} '{where}', which this command reads and the output "
                              "would replace; choose another directory")
        raise OutputError(f"{option} '{path}' is {what} '{where}', which this command reads; writing it would destroy "
                          "the input: choose another path")


_protected: list[RunInputs] = []


@contextmanager
def protected(inputs: RunInputs):
    """While the block runs, `check_write` refuses to replace any of `inputs` (nested blocks add up)."""
    _protected.append(inputs)
    try:
        yield inputs
    finally:
        _protected.remove(inputs)


def check_write(path: str | Path, option: str = "output", is_dir: bool = False) -> None:
    """OutputError if `path` is an input of a running command (see protected); the write primitives call it."""
    for inputs in _protected:
        inputs.refuse_output(path, option, is_dir)
