"""Run the real `fastardiff` entry point in-process (shared by the CLI tests)."""
from fastardiff.cli import main


def run_cli(args, capsys):
    """Returns (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
