"""`fastardiff export` user errors: one clear line, exit status 2, nothing written."""
from __future__ import annotations

import importlib.util
import os

import pytest
from click.testing import CliRunner

from fastardiff.cli import group, main
from fastardiff.errors import CheckpointError, FastardiffError, MissingDependencyError


def _invoke(args):
    return CliRunner().invoke(group, ["export", *args])


def test_unknown_target_fails_before_any_work(tmp_path, random_checkpoint_path):
    result = _invoke(["--ckpt", str(random_checkpoint_path), "--target", "tflite", "--out", str(tmp_path / "e")])
    assert isinstance(result.exception, FastardiffError)
    assert "unknown export target 'tflite'" in str(result.exception) and "onnx" in str(result.exception)
    assert not (tmp_path / "e").exists()


def test_error_line_and_exit_status_through_main(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "--ckpt", str(tmp_path / "missing.pt"), "--target", "onnx", "--out", str(tmp_path / "e")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint") and "does not exist" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoint_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    result = _invoke(["--ckpt", str(bad), "--target", "onnx", "--out", str(tmp_path / "e")])
    assert isinstance(result.exception, CheckpointError)
    assert "not a readable fastardiff checkpoint" in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_unwritable_output_dir(tmp_path, random_checkpoint_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = _invoke(["--ckpt", str(random_checkpoint_path), "--target", "onnx", "--out", str(blocker / "engines")])
    assert isinstance(result.exception, FastardiffError) and "is a file, so the directory cannot be created" in str(
        result.exception)
    result = _invoke(["--ckpt", str(random_checkpoint_path), "--target", "onnx", "--out", str(blocker)])
    assert isinstance(result.exception, FastardiffError) and "is a file" in str(result.exception)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = _invoke(["--ckpt", str(random_checkpoint_path), "--target", "onnx", "--out", str(tmp_path / "mine")])
    assert isinstance(result.exception, FastardiffError) and "refusing to replace" in str(result.exception)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent_dir(tmp_path, random_checkpoint_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        result = _invoke(["--ckpt", str(random_checkpoint_path), "--target", "onnx", "--out", str(ro / "e")])
        assert isinstance(result.exception, FastardiffError) and "not writable" in str(result.exception)
    finally:
        ro.chmod(0o755)


def test_missing_dependency_names_the_extra(tmp_path, random_checkpoint_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    result = _invoke(["--ckpt", str(random_checkpoint_path), "--target", "onnx", "--out", str(tmp_path / "e")])
    assert isinstance(result.exception, MissingDependencyError)
    assert "'onnxruntime' is not installed" in str(result.exception) and "fastardiff[onnx]" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


def test_option_ranges_are_checked(tmp_path, random_checkpoint_path):
    result = _invoke(["--ckpt", str(random_checkpoint_path), "--target", "onnx", "--out", str(tmp_path / "e"),
                      "--batch", "9"])
    assert result.exit_code == 2 and "--batch" in result.output
    result = _invoke(["--ckpt", str(random_checkpoint_path), "--target", "onnx", "--out", str(tmp_path / "e"),
                      "--precision", "int3"])
    assert result.exit_code == 2 and "--precision" in result.output
    assert list(tmp_path.iterdir()) == []
