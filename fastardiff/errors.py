"""User-facing errors. The CLI prints their message as one line and exits non-zero."""


class FastardiffError(Exception):
    """An error caused by user input (paths, checkpoints, engines, prompts); message names problem and fix."""


class CheckpointError(FastardiffError):
    pass


class EngineError(FastardiffError):
    pass


class MissingDependencyError(FastardiffError):
    def __init__(self, package: str, extra: str, purpose: str = ""):
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(
            f"python package '{package}' is not installed{what}; install it with "
            f"`pip install 'fastardiff[{extra}]'`"
        )
        self.package = package
        self.extra = extra
