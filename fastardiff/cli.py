"""The `fastardiff` click group. Subcommands live beside the code they drive and are imported lazily,
so `fastardiff run` on ONNX engines never imports torch.

Every entry point (`fastardiff`, `fastardiff-export`, `fastardiff-run`) runs through `_invoke`:
  - a user error (FastardiffError, a bad option, an unusable file) prints one line `error: ...`, exit status 2;
  - anything unexpected prints one line `internal error: <type>: <message> (run with -v for the traceback)`,
    exit status 1, and with -v the traceback as well;
  - SIGTERM, SIGINT (Ctrl-C) or SIGHUP stop the command through the same clean-up paths as an error (staged files
    and temporary directories removed, nothing renamed into place), then one line `interrupted by SIG...`, exit
    status 128 + the signal's number.
Before a subcommand's body runs, the optional packages it needs are checked (REQUIREMENTS), and a missing one is
an error naming the pyproject extra that installs it.
"""
from __future__ import annotations

import functools
import importlib
import logging
import sys
from contextlib import contextmanager

import click

from .errors import FastardiffError, require

# name -> "module:attribute" of a click.Command; each module imports heavy libraries inside its commands.
SUBCOMMANDS = {
    "train": "fastardiff.recipes.cli:train_command",
    "eval": "fastardiff.recipes.cli:eval_command",
    "info": "fastardiff.recipes.cli:info_command",
    "export": "fastardiff.exporter.cli:export_command",
    "run": "fastardiff.runtime.cli:run_command",
    "bench": "fastardiff.exporter.bench_cli:bench_command",
    "calibrate": "fastardiff.exporter.calibrate:calibrate_command",
    "serve": "fastardiff.runtime.serve.cli:serve_command",
}

# command path -> (package, extra, condition on the parsed parameters or None) checked before the command runs.
# `run` checks its own (torch for --ckpt; each backend its library when the manifest names it).
REQUIREMENTS: dict[str, tuple] = {
    "train": (("torch", "train", None), ("mlxtend", "train", None)),
    "eval": (("torch", "train", None), ("scipy", "train", None), ("mlxtend", "train", None)),
    "info": (("torch", "train", None),),
    "export": (("torch", "export", None),),
    "calibrate": (("torch", "export", None),),
    "bench pipeline": (("torch", "export", None), ("onnxruntime", "onnx", None),
                       ("onnx", "export", lambda p: p.get("engine_dir") is None),
                       ("onnxscript", "export", lambda p: p.get("engine_dir") is None),
                       ("matplotlib", "bench", lambda p: p.get("json_path") or p.get("plot_path") or p.get("record"))),
    "bench kernels": (("torch", "export", None),),
    "serve": (("ray", "serve", None),),
}

_state = {"verbose": 0}
INTERRUPTS = ("SIGTERM", "SIGINT", "SIGHUP")      # signals that stop a command cleanly (exit status 128 + signal)


class Interrupted(BaseException):
    """Raised in the main thread by a stopping signal. A BaseException (as KeyboardInterrupt): `except Exception`
    does not swallow it, while every `except BaseException` / `finally` / `with` clean-up on the way out runs
    (staged outputs and temporary directories removed, nothing renamed into place)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def signals_raise_interrupted():
    """While the block runs, SIGTERM / SIGINT / SIGHUP raise Interrupted once; a repeat during the clean-up is
    ignored (the clean-up finishes). A signal the process was started ignoring (nohup's SIGHUP, SIGINT of a
    background job) stays ignored. Main thread only (signal handlers can only be set there)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {}
    for name in INTERRUPTS:
        number = getattr(signal, name, None)
        if number is None or signal.getsignal(number) is signal.SIG_IGN:    # ignored (nohup, `cmd &`): it stays so
            continue
        try:
            previous[number] = signal.signal(number, handler)
        except (OSError, ValueError):
            pass
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _with_requirements(path: str, command: click.Command) -> click.Command:
    """Check REQUIREMENTS[path] (and those of a group's subcommands) before the command's callback runs;
    `--help` needs none of them."""
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            _with_requirements(f"{path} {name}", sub)
    needs = REQUIREMENTS.get(path)
    callback = command.callback
    if not needs or callback is None or getattr(callback, "_fastardiff_requirements", False):
        return command

    @functools.wraps(callback)
    def checked(*args, **params):
        for package, extra, condition in needs:
            if condition is None or condition(params):
                require(package, extra, f"`fastardiff {path}`")
        return callback(*args, **params)

    checked._fastardiff_requirements = True
    command.callback = checked
    return command


def _load_command(spec: str, name: str | None = None) -> click.Command:
    module_name, attr = spec.split(":")
    command = getattr(importlib.import_module(module_name), attr)
    return _with_requirements(name or command.name, command)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx, name):
        spec = SUBCOMMANDS.get(name)
        return _load_command(spec, name) if spec else None


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s" if verbose <= 0 else "%(levelname)s %(name)s: %(message)s")


def set_verbose(ctx, param, value) -> int:
    """Callback of every -v/--verbose option: remember it for the last-resort guard (tracebacks)."""
    if value:
        _state["verbose"] = max(_state["verbose"], int(value))
        logging.getLogger().setLevel(logging.DEBUG)
    return value


def verbose_option(expose_value: bool = False):
    """`-v/--verbose` for a command that is also a console script (the group has its own)."""
    return click.option("-v", "--verbose", count=True, expose_value=expose_value, callback=set_verbose,
                        help="More detail; on an internal error, the traceback.")


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", count=True, help="More detail (-vv for debug); tracebacks of internal errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def group(verbose: int, quiet: bool) -> None:
    """fastardiff: train, export and run AR+diffusion generators with speculative decoding."""
    if verbose:
        _state["verbose"] = verbose
    setup_logging(-1 if quiet else verbose)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _asked_verbose(args) -> bool:
    if _state["verbose"]:
        return True
    for arg in args or ():
        if arg == "--":
            break
        if arg == "--verbose" or (arg.startswith("-v") and set(arg[1:]) == {"v"}):
            return True
    return False


def _fail(message: str, code: int = 2):
    click.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(code)


def _interrupted(signum: int):
    """One line, exit status 128 + signal: the command stopped, and what it had not finished is gone."""
    import signal

    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    try:
        click.echo(f"interrupted by {name}: stopped; unfinished outputs were removed, nothing half-written was "
                   "left", err=True)
    except OSError:
        pass
    sys.exit(128 + signum)


def _interruption(err: BaseException) -> "Interrupted | None":
    """The Interrupted in `err`'s cause/context chain, if any: a library (torch's exporter, say) that catches every
    BaseException and raises its own error would otherwise turn a stopping signal into an ordinary failure."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, Interrupted):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _invoke(command, args=None, prog_name: str = "fastardiff") -> None:
    """Run a click command (or a zero-argument function returning one) with the error conventions above."""
    args = list(sys.argv[1:] if args is None else args)
    _state["verbose"] = 0
    try:
        with signals_raise_interrupted():
            try:
                if not isinstance(command, click.Command):
                    command = command()
                command.main(args=args, prog_name=prog_name, standalone_mode=False)
            except Exception as err:    # a library that wrapped the signal's Interrupted in its own error
                interrupted = _interruption(err)
                if interrupted is None:
                    raise
                raise interrupted from err
    except Interrupted as err:
        _interrupted(err.signum)
    except FastardiffError as err:
        _fail(str(err))
    except click.exceptions.Abort as err:     # click's own Ctrl-C (a prompt): as SIGINT
        if isinstance(err.__context__, Interrupted):
            _interrupted(err.__context__.signum)
        _interrupted(2)
    except click.exceptions.NoArgsIsHelpError as err:  # a bare group: its help, as click prints it
        err.show()
        sys.exit(err.exit_code)
    except click.ClickException as err:                 # bad option or argument: one line, exit 2
        where = getattr(getattr(err, "ctx", None), "command_path", None)
        hint = f" (see `{where} --help`)" if isinstance(err, click.UsageError) and where else ""
        _fail(err.format_message() + hint)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _interrupted(2)
    except BrokenPipeError:
        sys.exit(141)                                    # 128 + SIGPIPE: the reader went away
    except MemoryError:
        _fail("out of memory; ask for fewer images per run (--num-images) or a smaller batch", 1)
    except OSError as err:                               # the environment: permissions, a full disk, a bad path
        if _asked_verbose(args):
            import traceback

            traceback.print_exc()
        where = f" '{err.filename}'" if getattr(err, "filename", None) else ""
        _fail(f"cannot access{where}: {err.strerror or err}; check the path, its permissions and free space")
    except Exception as err:  # noqa: BLE001 - the last-resort guard: no user ever sees a bare traceback
        verbose = _asked_verbose(args)
        if verbose:
            import traceback

            traceback.print_exc()
        message = _one_line(str(err)) or "(no message)"
        if len(message) > 500:
            message = message[:497] + "..."
        hint = "" if verbose else " (run with -v for the traceback)"
        click.echo(f"internal error: {type(err).__name__}: {message}{hint}", err=True)
        sys.exit(1)


def main(args=None) -> None:
    _invoke(group, args)


def export_main(args=None) -> None:
    """Console script `fastardiff-export`: alias of `fastardiff export`."""
    setup_logging(0)
    _invoke(lambda: _load_command(SUBCOMMANDS["export"], "export"), args, "fastardiff-export")


def run_main(args=None) -> None:
    """Console script `fastardiff-run`: alias of `fastardiff run`."""
    setup_logging(0)
    _invoke(lambda: _load_command(SUBCOMMANDS["run"], "run"), args, "fastardiff-run")
