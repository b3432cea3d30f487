"""The `fastardiff` group: every subcommand resolves, the aliases work, and listing them stays light."""
import subprocess
import sys

from click.testing import CliRunner

from fastardiff.cli import SUBCOMMANDS, group


def test_help_lists_every_subcommand():
    result = CliRunner().invoke(group, ["--help"])
    assert result.exit_code == 0, result.output
    for name in SUBCOMMANDS:
        assert name in result.output


def test_each_subcommand_has_help():
    for name in SUBCOMMANDS:
        result = CliRunner().invoke(group, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output


def test_listing_commands_imports_no_heavy_library():
    code = ("import sys; from click.testing import CliRunner; from fastardiff.cli import group; "
            "r = CliRunner().invoke(group, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_console_script_aliases_show_their_command():
    for script, expected in (("fastardiff.cli:export_main", "--target"), ("fastardiff.cli:run_main", "--engine")):
        module, func = script.split(":")
        code = f"import sys; sys.argv = ['x', '--help']; from {module} import {func}; {func}()"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout
