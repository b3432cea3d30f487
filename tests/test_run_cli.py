"""`fastardiff-run`: the README command on the shipped model, and one clear error per bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastardiff.cli import run_main


def run_in_process(args, capsys):
    """Run the console script's entry point in this process; returns (exit code, stdout, stderr)."""
    try:
        run_main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_shipped_model_writes_png_and_stats(shipped_checkpoint_path, tmp_path):
    from PIL import Image

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "from fastardiff.cli import run_main; run_main()", "--ckpt",
           str(shipped_checkpoint_path), "--prompt", "3", "--out", "x.png", "--stats-json", "s.json",
           "--out-dir", "singles", "--gamma", "4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    image = Image.open(tmp_path / "x.png")
    assert image.size == (36, 36) and image.mode == "L"          # a 1x1 grid of one 32x32 digit, 2 px border
    assert (tmp_path / "singles" / "0000-three.png").exists()
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["images"] == 1 and stats["tokens"] == 64 and stats["gamma"] == 4
    assert stats["tokens_per_target_call"] > 1.0 and stats["target_calls"] < 64
    # the command warms its engines at the run's shapes before timing (speculative.warm_up), outside the counts
    assert stats["warm_up"]["target_calls"] >= 2 and stats["warm_up"]["draft_calls"] >= 1, stats["warm_up"]
    assert "tokens_per_target_call" in proc.stdout and "warm-up (not in total)" in proc.stdout     # the table
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.fixture(scope="module")
def nan_checkpoint_path(random_checkpoint, tmp_path_factory):
    import copy

    import torch

    from fastardiff.recipes.checkpoint import save_checkpoint

    broken = copy.deepcopy(random_checkpoint)
    with torch.no_grad():
        broken.target.head.bias.fill_(float("nan"))
    return save_checkpoint(tmp_path_factory.mktemp("nan") / "nan.pt", broken)


@pytest.fixture(scope="module")
def old_manifest_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("old-engines")
    (d / "manifest.json").write_text(json.dumps({"format_version": 0, "backend": "onnxruntime"}))
    return d


BAD_INPUTS = {
    "unknown-prompt": (["--prompt", "eleven"], "unknown class 'eleven'"),
    "class-id-out-of-range": (["--prompt", "12"], "out of range"),
    "gamma-below-one": (["--prompt", "3", "--gamma", "0"], "--gamma must be at least 1"),
    "gamma-exceeds-n": (["--prompt", "3", "--gamma", "64"], "N = 64"),
    "engine-dir-without-manifest": (["--engine", "{empty}", "--prompt", "3"], "has no manifest.json"),
    "manifest-other-version": (["--engine", "{old}", "--prompt", "3"], "format version 0"),
    "nan-from-engine": (["--ckpt", "{nan}", "--prompt", "3", "--gamma", "4"], "returned NaN"),
    "missing-checkpoint": (["--ckpt", "{missing}", "--prompt", "3"], "does not exist"),
    "engine-and-ckpt": (["--engine", "{empty}", "--prompt", "3"], "exactly one of"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_error_line_and_no_image(case, random_checkpoint_path, nan_checkpoint_path,
                                                     old_manifest_dir, tmp_path, capsys, monkeypatch):
    args, expected = BAD_INPUTS[case]
    empty = tmp_path / "empty-engines"
    empty.mkdir()
    paths = {"{empty}": str(empty), "{old}": str(old_manifest_dir), "{nan}": str(nan_checkpoint_path),
             "{missing}": str(tmp_path / "nope.pt")}
    args = [paths.get(a, a) for a in args]
    if "--engine" not in args and "--ckpt" not in args:
        args = ["--ckpt", str(random_checkpoint_path)] + args
    if case == "engine-and-ckpt":
        args += ["--ckpt", str(random_checkpoint_path)]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    monkeypatch.chdir(out_dir)
    code, _stdout, stderr = run_in_process(args + ["--out", "x.png", "--out-dir", "singles",
                                                    "--stats-json", "s.json"], capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert list(Path(out_dir).rglob("*")) == []      # no image, no stats, no temp file


def test_prompt_parsing():
    from fastardiff.runtime.prompts import PromptError, parse_prompts

    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert parse_prompts("7", names) == [7]
    assert parse_prompts("Seven", names) == [7]
    assert parse_prompts("3,7 nine", names) == [3, 7, 9]
    assert parse_prompts("3, seven", names, num_images=5) == [3, 7, 3, 7, 3]
    for bad in ("", "ten", "10", "-1"):
        with pytest.raises(PromptError):
            parse_prompts(bad, names)


def test_runs_stream_their_images_chunk_by_chunk(random_checkpoint_path, tmp_path, capsys, monkeypatch):
    """Single images are staged as each engine-sized chunk decodes (generate's on_images: the run never holds all
    its images), and they, and the grid, are the images a run keeping them all returns for the same settings."""
    import numpy as np
    from PIL import Image

    from fastardiff.runtime import speculative
    from fastardiff.runtime.images import make_grid, to_uint8

    real_generate, seen = speculative.generate, {}

    def in_chunks_of_four(engines, classes, gen, stats=None, max_batch=None, on_images=None, warm=False):
        seen.update(engines=engines, classes=classes, gen=gen, chunks=[])

        def record(images, first):
            seen["chunks"].append((first, len(images)))
            on_images(images, first)

        images, stats = real_generate(engines, classes, gen, stats, 4, record, warm=warm)
        assert images is None                              # nothing kept: every chunk went to the writer
        return images, stats

    monkeypatch.setattr(speculative, "generate", in_chunks_of_four)
    code, _, err = run_in_process(["--ckpt", str(random_checkpoint_path), "--prompt", "0,1,2", "--num-images", "6",
                                   "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "singles"),
                                   "--gamma", "2", "--seed", "5"], capsys)
    assert code == 0, err
    assert seen["chunks"] == [(0, 4), (4, 2)]
    kept, _ = real_generate(seen["engines"], seen["classes"], seen["gen"], max_batch=4)
    pixels = to_uint8(kept)
    names = seen["engines"].manifest.config["class_names"]
    for i, c in enumerate(seen["classes"]):
        single = np.asarray(Image.open(tmp_path / "singles" / f"{i:04d}-{names[c]}.png"))
        np.testing.assert_array_equal(single, pixels[i, ..., 0])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")), make_grid(pixels)[..., 0])


def test_a_run_failing_after_its_first_chunk_leaves_nothing(random_checkpoint_path, tmp_path, capsys, monkeypatch):
    """Streaming keeps all-or-nothing: images of chunks already decoded stay in the staging area and are removed
    when a later chunk fails."""
    from fastardiff.errors import EngineError
    from fastardiff.runtime import speculative

    real_generate = speculative.generate

    def fails_after_one_chunk(engines, classes, gen, stats=None, max_batch=None, on_images=None, warm=False):
        def then_fail(images, first):
            on_images(images, first)
            raise EngineError("engine 'decoder' returned NaN or inf; re-export the engines")

        return real_generate(engines, classes, gen, stats, 2, then_fail, warm=warm)

    monkeypatch.setattr(speculative, "generate", fails_after_one_chunk)
    code, _, err = run_in_process(["--ckpt", str(random_checkpoint_path), "--prompt", "0,1,2", "--num-images", "4",
                                   "--out-dir", str(tmp_path / "new" / "singles"), "--out", str(tmp_path / "g.png"),
                                   "--gamma", "2"], capsys)
    assert code == 2 and "NaN" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []      # no image, no staging dir, no created dir


def test_device_is_checked_against_the_engines_backend(tmp_path):
    """`--device` with `--engine` is a request the backend must honour, never a silent CPU fallback: ONNX Runtime
    without a CUDA provider, AOTInductor packages compiled for another device, TensorRT on the CPU are clear errors;
    --device cpu keeps ONNX Runtime on its CPU provider."""
    import types

    import onnxruntime as ort

    from fastardiff.errors import EngineError
    from fastardiff.runtime.backend_aoti import AotiEngines
    from fastardiff.runtime.backend_onnxruntime import device_providers
    from fastardiff.runtime.backend_tensorrt import TensorRTEngines

    assert device_providers(ort, None) is None and device_providers(ort, "cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(EngineError, match="no CUDA execution provider"):
            device_providers(ort, "cuda:0")
    gpu_build = types.SimpleNamespace(device="cuda", engines={})
    with pytest.raises(EngineError, match="compiled for cuda; re-export"):
        AotiEngines(tmp_path, gpu_build, device="cpu", verify=False)
    with pytest.raises(EngineError, match="CUDA GPU only"):
        TensorRTEngines(tmp_path, types.SimpleNamespace(), device="cpu")


def test_run_cli_device_cuda_on_onnx_engines_without_cuda_is_an_error(shared_onnx_export, tmp_path, capsys):
    import onnxruntime as ort

    from cli_runner import run_cli

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    code, _, err = run_cli(["run", "--engine", str(shared_onnx_export[0]), "--prompt", "3", "--device", "cuda",
                            "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "no CUDA execution provider" in err and "--device cpu" in err
    assert not (tmp_path / "x.png").exists()


def test_the_statistics_file_is_readable_like_the_images(tmp_path):
    """--stats-json is written atomically (a temporary file renamed into place) with the permissions any new file
    of the user gets (0644 under umask 022), not the temporary file's private 0600."""
    from fastardiff.runtime.stats import RunStats

    old = os.umask(0o022)
    try:
        RunStats().write_json(tmp_path / "s.json")
    finally:
        os.umask(old)
    assert (tmp_path / "s.json").stat().st_mode & 0o777 == 0o644
