"""`fastardiff train / eval / info`: the shipped model, bad input, a tiny resumable training run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cli_runner import run_cli


def assert_one_error_line(code, out, err, *fragments):
    assert code != 0
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_info_on_shipped_checkpoint(shipped_checkpoint_path, capsys):
    from fastardiff.recipes.checkpoint import file_sha256

    code, out, err = run_cli(["info", "--ckpt", str(shipped_checkpoint_path), "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["config"]["name"] == "tiny-mnist"
    assert info["files"][str(shipped_checkpoint_path)]["sha256"] == file_sha256(shipped_checkpoint_path)
    assert set(info["parameters"]) == {"target", "draft", "decoder"}
    assert info["parameters"]["draft"] < info["parameters"]["target"]
    cal = info["calibration"]
    assert 0 < cal["e_max"] <= 1 and 0 <= cal["target_mean"] <= 1
    assert cal["tau_global"] == pytest.approx(0.3 * cal["target_mean"] - 0.1 * cal["target_std"])
    code, out, _ = run_cli(["info", "--ckpt", str(shipped_checkpoint_path)], capsys)
    assert code == 0 and "parameters" in out and "sha256" in out


def test_shipped_files_are_small_and_weights_only(shipped_checkpoint_path):
    from fastardiff.recipes.checkpoint import default_classifier_path

    classifier = default_classifier_path()
    assert shipped_checkpoint_path.stat().st_size + classifier.stat().st_size <= 20 * 2**20
    for path in (shipped_checkpoint_path, classifier):
        payload = torch.load(path, weights_only=True)
        assert payload["format"].startswith("fastardiff-")
        assert path.with_suffix(".json").exists()


def _bad_inputs(tmp_path, random_checkpoint_path):
    import dataclasses

    from fastardiff.recipes.config import get_config

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    payload = torch.load(random_checkpoint_path, weights_only=True)
    other = tmp_path / "other-family.pt"
    torch.save({**payload, "family": "fast-ardiff"}, other)
    mismatched = tmp_path / "mismatched.pt"
    wrong = dataclasses.replace(get_config("tiny-mnist"), width=32)
    torch.save({**payload, "config": wrong.to_dict()}, mismatched)
    return [(tmp_path / "nope.pt", "does not exist"), (junk, "not a readable fastardiff checkpoint"),
            (other, "model family 'fast-ardiff'"), (mismatched, "do not match its config")]


@pytest.mark.parametrize("command", ["info", "eval"])
def test_bad_checkpoints_give_one_clear_error_line(command, tmp_path, random_checkpoint_path, capsys):
    for path, fragment in _bad_inputs(tmp_path, random_checkpoint_path):
        code, out, err = run_cli([command, "--ckpt", str(path)], capsys)
        assert code == 2
        assert_one_error_line(code, out, err, fragment, str(path))


def test_eval_rejects_a_model_that_is_not_tiny_mnist(tmp_path, random_checkpoint_path, capsys):
    payload = torch.load(random_checkpoint_path, weights_only=True)
    renamed = tmp_path / "renamed.pt"
    torch.save({**payload, "config": {**payload["config"], "name": "other", "dataset": "imagenet"}}, renamed)
    assert_one_error_line(*run_cli(["eval", "--ckpt", str(renamed), "--n", "4"], capsys), "mnist")
    missing = tmp_path / "no-classifier.pt"
    assert_one_error_line(*run_cli(["eval", "--ckpt", str(random_checkpoint_path), "--classifier", str(missing)],
                                   capsys), "digit classifier")


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastardiff", "info", "--ckpt", str(tmp_path / "x.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_tiny_train_run_is_loadable_and_resumes_exactly(tmp_path, capsys):
    from fastardiff.recipes.checkpoint import load_checkpoint

    # one thread: multi-threaded CPU backward of indexing ops is not bit-reproducible
    common = ["train", "--recipe", "tiny-mnist-small", "--steps", "6", "--target-fraction", "0.5", "--classifier-steps",
              "2", "--save-every", "2", "--no-progress", "--threads", "1", "--calibration-images", "50"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    code, out, err = run_cli(common + ["--out", str(straight)], capsys)
    assert code == 0, err
    # interrupted after the first joint step (target stage = steps 0-2), then resumed
    code, _, err = run_cli(common + ["--out", str(split), "--stop-after", "4"], capsys)
    assert code == 0, err
    state = torch.load(split / "resume-state.pt", weights_only=True)
    assert state["step"] == 4
    assert load_checkpoint(split / "tiny-mnist-small.pt").config.name == "tiny-mnist-small"
    code, _, err = run_cli(common + ["--out", str(split), "--resume"], capsys)
    assert code == 0, err
    assert torch.load(split / "resume-state.pt", weights_only=True)["step"] == 6
    a = load_checkpoint(straight / "tiny-mnist-small.pt")
    b = load_checkpoint(split / "tiny-mnist-small.pt")
    for name in ("target", "draft", "decoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name} differs after resume"
    assert a.calibration.e_max == b.calibration.e_max > 0
    assert (straight / "digit-classifier.pt").exists() and (straight / "tiny-mnist-small.json").exists()
    # starting over an existing run, or resuming a directory without a state, are clear errors
    assert_one_error_line(*run_cli(common + ["--out", str(split)], capsys), "--resume")
    assert_one_error_line(*run_cli(common + ["--out", str(tmp_path / "empty"), "--resume"],
                                   capsys), "--resume")


def test_eval_on_shipped_model(shipped_checkpoint_path, tmp_path, capsys):
    from PIL import Image

    grid = tmp_path / "grid.png"
    code, out, err = run_cli(["eval", "--ckpt", str(shipped_checkpoint_path), "--n", "40", "--json",
                              "--grid", str(grid)], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["n"] == 40
    assert metrics["classifier_test_accuracy"] >= 0.97
    assert metrics["class_accuracy"] >= 0.75  # the full n=500 figure is in docs/models.md
    assert metrics["frechet_distance"] > 0
    assert 0 < metrics["acceptance_rate_estimate"] <= 1
    with Image.open(grid) as img:
        assert img.size == (2 * 10 * 34, 2 * 4 * 34)
