"""The `fastardiff` click group. Subcommands live beside the code they drive and are imported lazily,
so `fastardiff run` on ONNX engines never imports torch."""
from __future__ import annotations

import importlib
import logging
import sys

import click

from .errors import FastardiffError

# name -> "module:attribute" of a click.Command; each module imports heavy libraries inside its commands.
SUBCOMMANDS = {
    "train": "fastardiff.recipes.cli:train_command",
    "eval": "fastardiff.recipes.cli:eval_command",
    "info": "fastardiff.recipes.cli:info_command",
    "export": "fastardiff.exporter.cli:export_command",
    "run": "fastardiff.runtime.cli:run_command",
    "bench": "fastardiff.exporter.bench_cli:bench_command",
    "calibrate": "fastardiff.exporter.calibrate:calibrate_command",
}


def _load_command(spec: str) -> click.Command:
    module_name, attr = spec.split(":")
    return getattr(importlib.import_module(module_name), attr)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx, name):
        spec = SUBCOMMANDS.get(name)
        return _load_command(spec) if spec else None


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s" if verbose <= 0 else "%(levelname)s %(name)s: %(message)s")


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", count=True, help="More detail (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def group(verbose: int, quiet: bool) -> None:
    """fastardiff: train, export and run AR+diffusion generators with speculative decoding."""
    setup_logging(-1 if quiet else verbose)


def _invoke(command: click.Command, args=None) -> None:
    try:
        command.main(args=args, standalone_mode=False)
    except FastardiffError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)


def main(args=None) -> None:
    _invoke(group, args)


def export_main(args=None) -> None:
    """Console script `fastardiff-export`: alias of `fastardiff export`."""
    setup_logging(0)
    _invoke(_load_command(SUBCOMMANDS["export"]), args)


def run_main(args=None) -> None:
    """Console script `fastardiff-run`: alias of `fastardiff run`."""
    setup_logging(0)
    _invoke(_load_command(SUBCOMMANDS["run"]), args)
