"""User-facing errors. The CLI prints their message as one line and exits non-zero."""
from __future__ import annotations


class FastardiffError(Exception):
    """An error caused by user input (paths, checkpoints, engines, prompts); message names problem and fix."""


class CheckpointError(FastardiffError):
    pass


class EngineError(FastardiffError):
    pass


class OutputError(FastardiffError):
    """An output destination that cannot be written (checked before any work; nothing is left behind)."""


class MissingDependencyError(FastardiffError):
    def __init__(self, package: str, extra: str, purpose: str = ""):
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(
            f"python package '{package}' is not installed{what}; install it with "
            f"`pip install 'fastardiff[{extra}]'`"
        )
        self.package = package
        self.extra = extra


def is_installed(package: str) -> bool:
    """Whether `package` can be imported, without importing it."""
    import importlib.util
    import sys

    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def require(package: str, extra: str, purpose: str = "") -> None:
    """Raise MissingDependencyError naming the pyproject extra unless `package` is importable."""
    if not is_installed(package):
        raise MissingDependencyError(package, extra, purpose)
