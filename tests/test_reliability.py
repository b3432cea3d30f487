"""Reliability (issue 11): the validated manifest, all-or-nothing run outputs, option ranges, optional
dependencies named by their extra, and the last-resort guard of every entry point. Fast: tiny synthetic
manifests with fake engine files, and the torch reference backend on a random tiny checkpoint."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from fastardiff.cli import export_main, main, run_main
from fastardiff.errors import EngineError
from fastardiff.runtime.manifest import ENGINE_NAMES, MANIFEST_NAME, Manifest, load_manifest
from fastardiff.runtime.stats import RunStats

# ---------------------------------------------------------------------------------------------------------------
# helpers shared with test_fuzz.py


def call(entry, args):
    """Run a console entry point in-process; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            entry(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    """stderr lines that are not the (informational) gamma-auto table."""
    return [line for line in err.splitlines() if line.strip()]


def assert_user_error(code, out, err, *fragments):
    assert "Traceback" not in out + err, err
    assert code == 2, (code, err)
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*"))


def tiny_config() -> dict:
    from fastardiff.recipes.config import get_config

    return get_config("tiny-mnist-small").to_dict()


def fake_manifest(engine_dir: Path, rollouts=(1, 2), backend: str = "onnxruntime") -> dict:
    """A valid manifest dict whose engine files exist in `engine_dir` with matching sha256 (they are not
    loadable engines: only the schema, the file checks and the CLI layers above the backend are exercised)."""
    from fastardiff.recipes.config import Calibration

    engine_dir.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config()
    seq = cfg["n_cond"] + (cfg["image_size"] // cfg["patch"]) ** 2 - 1
    engines = {}
    names = list(ENGINE_NAMES) + [f"draft_rollout_{g}" for g in rollouts]
    for name in names:
        blob = f"fake engine {name}".encode()
        (engine_dir / f"{name}.onnx").write_bytes(blob)
        rollout = name.startswith("draft_rollout_")
        k = [64, 64, 64] if name == "decoder" else [1, 5, seq] if name == "target_verify" else [1, 1, seq]
        engines[name] = {"file": f"{name}.onnx", "sha256": hashlib.sha256(blob).hexdigest(),
                         "inputs": ["tokens", "lengths", "k_cache", "v_cache", "cond"], "outputs": ["mean"],
                         "profile": {"batch": [1, 4, 8], "K": k, "cache": [0, seq // 2, seq]},
                         "parity": {"atol": 1e-4, "rtol": 1e-3, "outputs": {}},
                         "kind": "draft_rollout" if rollout else name,
                         "gamma": int(name.rsplit("_", 1)[1]) if rollout else 0}
    return {"format_version": 1, "backend": backend, "family": "drift-ar", "config": cfg,
            "calibration": Calibration(e_max=1.0).to_dict(), "engines": engines, "precision": "fp32",
            "device": "cpu", "gamma": 4, "max_batch": 8, "config_hash": "0" * 16,
            "library_versions": {"numpy": np.__version__, "onnx": None}, "gpu": {}, "plugin": {},
            "export": {"target": "onnx"}}


def write_manifest_dict(engine_dir: Path, data) -> Path:
    engine_dir.mkdir(parents=True, exist_ok=True)
    (engine_dir / MANIFEST_NAME).write_text(json.dumps(data))
    return engine_dir


class FakeEngines:
    """Enough of the Engines protocol for the run CLI above `generate` (which tests replace)."""

    def __init__(self, manifest: Manifest):
        from fastardiff.runtime.capabilities import EngineCapabilities

        self.manifest = manifest
        self.rollouts = {}
        self.capabilities = EngineCapabilities.host()


def fake_generate(engines, classes, gen, stats=None, max_batch=None, on_images=None, warm=False):
    """Images in [-1, 1] shaped like the model's, without running any engine; like `generate`, handed to
    on_images (one chunk) instead of returned when it is given."""
    c = engines.manifest.config
    stats = stats or RunStats(mode=gen.mode, early_stop=gen.early_stop, gamma=gen.gamma)
    stats.images += len(classes)
    rng = np.random.default_rng(gen.seed)
    images = rng.uniform(-1, 1, (len(classes), c["channels"], c["image_size"], c["image_size"])).astype(np.float32)
    if on_images is not None:
        on_images(images, 0)
        return None, stats
    return images, stats


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """`fastardiff-run --engine <fake dir>` with the engines and the loop replaced: the CLI's own checks and
    output writing are real. Returns the engine dir."""
    import fastardiff.runtime.cli as run_cli
    import fastardiff.runtime.speculative as speculative

    engine_dir = tmp_path / "engines"
    write_manifest_dict(engine_dir, fake_manifest(engine_dir))
    monkeypatch.setattr(run_cli, "_load", lambda engine_dir, ckpt, device: FakeEngines(load_manifest(engine_dir)))
    monkeypatch.setattr(speculative, "generate", fake_generate)
    return engine_dir


# ---------------------------------------------------------------------------------------------------------------
# manifest schema


def test_valid_fake_manifest_loads_and_keeps_behaviour(tmp_path):
    d = tmp_path / "e"
    data = fake_manifest(d, rollouts=(1, 2, 3))
    data["engines"]["draft_rollout_2"]["some_future_field"] = 1   # unknown keys are ignored, as before
    data["future_top_level"] = {"x": 1}
    m = load_manifest(write_manifest_dict(d, data))
    assert m.rollout_engines() == {1: "draft_rollout_1", 2: "draft_rollout_2", 3: "draft_rollout_3"}
    assert m.engines["draft_rollout_2"].kind == "draft_rollout" and m.engines["decoder"].gamma == 0
    assert m.config == data["config"] and m.calibration == data["calibration"]
    assert Manifest.from_dict(m.to_dict()).to_dict() == m.to_dict()


def test_schema_knows_every_config_field():
    """A field added to DriftARConfig must be added to the manifest schema too (and vice versa)."""
    from fastardiff.runtime.manifest import _schema

    config_model = _schema().model_fields["config"].annotation
    assert set(config_model.model_fields) == set(tiny_config())
    from fastardiff.runtime.manifest import EngineEntry

    engine_model = _schema().model_fields["engines"].annotation.__args__[1]
    assert set(engine_model.model_fields) == set(EngineEntry.__dataclass_fields__)


def _set(path, value):
    def mutate(d):
        *head, last = path.split(".")
        for k in head:
            d = d[k]
        if value is DELETE:
            del d[last]
        else:
            d[last] = value
    return mutate


DELETE = object()
BAD_MANIFESTS = {
    "missing-width": (_set("config.width", DELETE), "field 'config.width' is missing"),
    "heads-as-text": (_set("config.heads", "four"), "field 'config.heads': must be a valid integer"),
    "heads-not-dividing": (_set("config.heads", 5), "field 'config.heads': 5 must divide width (64)"),
    "patch-not-dividing": (_set("config.patch", 5), "field 'config.patch'"),
    "zero-layers": (_set("config.draft_layers", 0), "config.draft_layers"),
    "bool-as-int": (_set("max_batch", True), "field 'max_batch': must be a valid integer"),
    "string-number": (_set("gamma", "4"), "field 'gamma'"),
    "gamma-too-long": (_set("gamma", 64), "field 'gamma': 64 needs 65 tokens"),
    "nan-e-max": (_set("calibration.e_max", float("nan")), "calibration.e_max': must be a finite number"),
    "negative-std": (_set("calibration.target_std", -0.1), "calibration.target_std"),
    "no-tau": (_set("calibration.tau_static", DELETE), "calibration.tau_static' is missing"),
    "class-names-count": (_set("config.class_names", ["a", "b"]), "config.class_names': has 2 names"),
    "class-names-repeat": (_set("config.class_names", ["x"] * 10), "repeats a name"),
    "precision": (_set("precision", "fp8"), "field 'precision'"),
    "no-decoder": (_set("engines.decoder", DELETE), "has no 'decoder' engine"),
    "engines-list": (_set("engines", []), "field 'engines': must be a valid dictionary"),
    "bad-sha": (_set("engines.decoder.sha256", "abc"), "engines.decoder.sha256': must be a sha256"),
    "absolute-file": (_set("engines.decoder.file", "/etc/passwd"), "engines.decoder.file': must be a relative"),
    "parent-file": (_set("engines.draft_step.file", "../x.onnx"), "engines.draft_step.file"),
    "rollout-without-gamma": (_set("engines.draft_rollout_1.gamma", 0), "engines.draft_rollout_1.gamma"),
    "rollout-gamma-twice": (_set("engines.draft_rollout_2.gamma", 1), "repeats the rollout length"),
    "profile-unordered": (_set("engines.target_verify.profile.batch", [8, 1, 4]), "min <= opt <= max"),
    "profile-negative": (_set("engines.target_verify.profile.cache", [-1, 0, 1]), "profile.cache.0"),
    "file-missing": (lambda d: d["engines"]["decoder"].update(file="gone.onnx"),
                     "field 'engines.decoder.file' names 'gone.onnx', which is missing"),
    "backend-empty": (_set("backend", ""), "field 'backend'"),
    "not-an-object": (lambda d: d.clear() or d.update(__list__=True), "is not a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_is_one_error_naming_the_field(case, tmp_path):
    mutate, expected = BAD_MANIFESTS[case]
    d = tmp_path / "e"
    data = fake_manifest(d)
    mutate(data)
    if data.get("__list__"):
        data = [1, 2, 3]
    write_manifest_dict(d, data)
    with pytest.raises(EngineError) as err:
        load_manifest(d)
    message = str(err.value)
    assert "\n" not in message and expected in message, message
    assert "fastardiff-export" in message or "re-export" in message, message


def test_format_version_is_checked_first(tmp_path):
    d = tmp_path / "e"
    for version, shown in ((2, "format version 2"), (True, "format version True"), ("1", "format version '1'"),
                           (None, "format version None")):
        write_manifest_dict(d, {"format_version": version, "config": "garbage", "engines": 7})
        with pytest.raises(EngineError, match=shown):
            load_manifest(d)
    write_manifest_dict(d, {"config": {}})
    with pytest.raises(EngineError, match="no format_version"):
        load_manifest(d)
    (d / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        load_manifest(d)


def test_bad_manifest_through_run_cli(tmp_path, monkeypatch):
    d = tmp_path / "e"
    data = fake_manifest(d)
    data["config"]["heads"] = 3
    write_manifest_dict(d, data)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    assert_user_error(*call(run_main, ["--engine", str(d), "--prompt", "3", "--gamma", "2", "--out-dir", "imgs",
                                       "--stats-json", "s.json"]), "config.heads", "re-export")
    assert files_under(out) == []


# ---------------------------------------------------------------------------------------------------------------
# run: numbers, destinations, all-or-nothing outputs

BAD_NUMBERS = [
    (["--temperature", "nan"], "--temperature", "(0, 10]"),
    (["--temperature", "0"], "--temperature", "(0, 10]"),
    (["--temperature", "-inf"], "--temperature", "(0, 10]"),
    (["--cfg", "inf"], "--cfg", "[0, 20]"),
    (["--cfg-scale", "-1"], "--cfg", "[0, 20]"),
    (["--eta", "100"], "--eta", "[0, 100)"),
    (["--eta", "-0.5"], "--eta", "[0, 100)"),
    (["--seed", "-1"], "--seed", "[0, 4294967295]"),
    (["--seed", "1.5"], "--seed", "integer"),
    (["--num-images", "0"], "--num-images", "[1, 10000]"),
    (["--num-images", "10001"], "--num-images", "[1, 10000]"),
    (["--gamma", "0"], "--gamma must be at least 1"),
    (["--gamma", "x"], "--gamma must be a positive integer or 'auto'"),
    (["--gamma", "99"], "--gamma 99 needs 100 tokens"),
    (["--early-stop", "sometimes"], "--early-stop"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--prompt", "", "--gamma", "2"], "--prompt is empty"),
    (["--bogus"], "No such option '--bogus'"),
]


@pytest.mark.parametrize("args", BAD_NUMBERS, ids=lambda a: " ".join(a[0]))
def test_bad_numbers_and_flags_fail_before_work(args, random_checkpoint_path, tmp_path, monkeypatch):
    import fastardiff.runtime.speculative as speculative

    flags, *fragments = args
    monkeypatch.setattr(speculative, "generate", lambda *a, **k: pytest.fail("generation started"))
    monkeypatch.chdir(tmp_path)
    base = ["--ckpt", str(random_checkpoint_path), "--out", "x.png", "--out-dir", "imgs", "--stats-json", "s.json"]
    if "--prompt" not in flags:
        base += ["--prompt", "3"]
    assert_user_error(*call(run_main, base + flags), *fragments)
    assert files_under(tmp_path) == []


def test_unwritable_destinations_fail_before_any_work(tmp_path, monkeypatch, fake_run):
    import fastardiff.runtime.cli as run_cli

    monkeypatch.setattr(run_cli, "_load", lambda *a: pytest.fail("engines loaded before the destinations were checked"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    (tmp_path / "a-dir").mkdir()
    cases = [
        (["--out", str(blocker / "x.png")], "--out", "is a file"),
        (["--out", str(tmp_path / "a-dir")], "--out", "is a directory"),     # click.Path(dir_okay=False)
        (["--out-dir", str(blocker)], "--out-dir", "is a file"),             # click.Path(file_okay=False)
        (["--stats-json", str(tmp_path / "a-dir"), "--out", "y.png"], "--stats-json", "is a directory"),
        (["--out", "/proc/fastardiff-test.png"], "--out", "not writable"),
        (["--out", str(tmp_path / "same.json"), "--stats-json", str(tmp_path / "same.json")], "both name"),
    ]
    for flags, *fragments in cases:
        before = files_under(tmp_path)
        assert_user_error(*call(run_main, ["--engine", str(fake_run), "--prompt", "3"] + flags), *fragments)
        assert files_under(tmp_path) == before


def test_run_writes_grid_singles_and_stats_together(tmp_path, fake_run):
    out = tmp_path / "deep" / "new"          # directories are created for the outputs
    code, stdout, err = call(run_main, ["--engine", str(fake_run), "--prompt", "3,seven", "--num-images", "3",
                                        "--gamma", "2", "--out", str(out / "grid.png"), "--out-dir",
                                        str(out / "imgs"), "--stats-json", str(out / "s.json")])
    assert code == 0, err
    assert sorted(p.name for p in (out / "imgs").iterdir()) == ["0000-three.png", "0001-seven.png", "0002-three.png"]
    assert json.loads((out / "s.json").read_text())["images"] == 3
    assert (out / "grid.png").stat().st_size > 0
    assert not [p for p in tmp_path.rglob(".*")], "staging dirs or temp files left behind"


def test_failure_while_writing_leaves_nothing_and_keeps_old_files(tmp_path, fake_run, monkeypatch):
    from PIL import Image

    out = tmp_path / "out"
    out.mkdir()
    old = out / "grid.png"
    old.write_bytes(b"previous grid")
    saved = []
    real_save = Image.Image.save

    def flaky_save(self, fp, *a, **k):
        saved.append(fp)
        if len(saved) == 3:
            raise OSError(28, "No space left on device", str(fp))
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    code, _, err = call(run_main, ["--engine", str(fake_run), "--prompt", "1,2,3", "--gamma", "2", "--out",
                                   str(old), "--out-dir", str(out / "imgs"), "--stats-json", str(out / "s.json")])
    assert code == 2 and "No space left on device" in err and len(error_lines(err)) == 1, err
    assert files_under(out) == [old] and old.read_bytes() == b"previous grid"


def test_failed_rename_at_commit_rolls_back(tmp_path, fake_run, monkeypatch):
    import fastardiff.runtime.images as images

    out = tmp_path / "out"
    out.mkdir()
    (out / "s.json").write_text("old stats")
    (out / "grid.png").write_bytes(b"old grid")
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((src, dst))
        if Path(dst).name == "0001-two.png":
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(images.os, "replace", failing_replace)
    code, _, err = call(run_main, ["--engine", str(fake_run), "--prompt", "1,2", "--gamma", "2",
                                   "--out", str(out / "grid.png"), "--out-dir", str(out / "imgs"),
                                   "--stats-json", str(out / "s.json")])
    assert code == 2 and "nothing was written" in err, err
    assert (out / "grid.png").read_bytes() == b"old grid" and (out / "s.json").read_text() == "old stats"
    assert sorted(p.name for p in out.rglob("*")) == ["grid.png", "s.json"]


def test_staged_outputs_unit(tmp_path):
    from fastardiff.errors import OutputError
    from fastardiff.runtime.images import StagedOutputs

    with pytest.raises(RuntimeError):
        with StagedOutputs() as staged:
            staged.path_for(tmp_path / "a" / "b" / "x.txt").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []          # created directories removed too
    with StagedOutputs() as staged:
        staged.path_for(tmp_path / "x.txt").write_text("1")
        with pytest.raises(OutputError, match="both be written"):
            staged.path_for(tmp_path / "x.txt")
        assert staged.commit() == [tmp_path / "x.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_hostile_class_names_do_not_escape_out_dir(tmp_path, monkeypatch):
    import fastardiff.runtime.cli as run_cli
    import fastardiff.runtime.speculative as speculative

    d = tmp_path / "e"
    data = fake_manifest(d)
    data["config"]["class_names"] = ["../../escape", "/abs"] + [f"c{i}" for i in range(8)]
    write_manifest_dict(d, data)
    monkeypatch.setattr(run_cli, "_load", lambda e, c, dev: FakeEngines(load_manifest(e)))
    monkeypatch.setattr(speculative, "generate", fake_generate)
    out = tmp_path / "o"
    code, _, err = call(run_main, ["--engine", str(d), "--prompt", "0,1", "--gamma", "2", "--out-dir", str(out)])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["0000-_escape.png", "0001-_abs.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "o"]


# ---------------------------------------------------------------------------------------------------------------
# optional dependencies and the last-resort guard


@pytest.mark.parametrize("entry, args, package, extra", [
    (main, ["info"], "torch", "train"),
    (main, ["eval", "--n", "4"], "scipy", "train"),
    (export_main, ["--target", "onnx", "--out", "e"], "torch", "export"),
    (main, ["export", "--target", "onnx", "--out", "e"], "torch", "export"),
    (run_main, ["--ckpt", "x.pt", "--prompt", "3"], "torch", "export"),
    (main, ["bench", "pipeline", "--engine", "e", "--json", "b.json"], "matplotlib", "bench"),
    (main, ["calibrate", "--ckpt", "{ckpt}"], "torch", "export"),
])
def test_missing_optional_dependency_names_the_extra(entry, args, package, extra, monkeypatch, tmp_path,
                                                     random_checkpoint_path):
    import fastardiff.errors as errors

    real = errors.is_installed
    monkeypatch.setattr(errors, "is_installed", lambda name: False if name == package else real(name))
    monkeypatch.chdir(tmp_path)
    args = [str(random_checkpoint_path) if a == "{ckpt}" else a for a in args]
    assert_user_error(*call(entry, args), f"'{package}' is not installed", f"fastardiff[{extra}]")
    assert files_under(tmp_path) == []


def test_help_needs_no_optional_dependency(monkeypatch):
    import fastardiff.errors as errors

    monkeypatch.setattr(errors, "is_installed", lambda name: False)
    code, out, _ = call(main, ["info", "--help"])
    assert code == 0 and "Usage:" in out


@pytest.mark.parametrize("entry, args", [(main, ["run"]), (run_main, []), (export_main, [])])
def test_last_resort_guard(entry, args, fake_run, monkeypatch):
    """An unexpected exception: one `internal error:` line and exit 1; -v adds the traceback."""
    import fastardiff.exporter.export as export
    import fastardiff.runtime.speculative as speculative

    def boom(*a, **k):
        raise ZeroDivisionError("the loop\nbroke")

    monkeypatch.setattr(speculative, "generate", boom)
    monkeypatch.setattr(export, "export_engines", boom)
    flags = (["--target", "onnx", "--out", str(fake_run.parent / "x")] if entry is export_main else
             ["--engine", str(fake_run), "--prompt", "3", "--gamma", "2", "--out", str(fake_run.parent / "x.png")])
    code, out, err = call(entry, args + flags)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == ["internal error: ZeroDivisionError: the loop; broke "
                                        "(run with -v for the traceback)"]
    code, out, err = call(entry, args + flags + ["-v"])
    assert code == 1 and "Traceback (most recent call last)" in err and "ZeroDivisionError" in err
    code, out, err = call(main, ["-v"] + args + flags) if entry is main else (1, "", "Traceback")
    assert code == 1 and "Traceback" in err
    assert not (fake_run.parent / "x.png").exists() and not (fake_run.parent / "x").exists()


def test_usage_errors_are_one_line(tmp_path):
    for entry, args, fragment in [(main, ["nope"], "No such command 'nope'"),
                                  (run_main, ["--engine", str(tmp_path)], "Missing option '--prompt'"),
                                  (export_main, ["--out", "x"], "Missing option '--target'"),
                                  (main, ["export", "--target", "onnx", "--out", "x", "--batch", "9"], "--batch"),
                                  (main, ["eval", "--n", "1"], "--n"),
                                  (main, ["eval", "--temperature", "nan"], "(0, 10]"),
                                  (main, ["train", "--out", str(tmp_path / "t"), "--seed", "-3"], "--seed"),
                                  (export_main, ["--target", "onnx", "--out", "x", "--atol", "nan"], "[0, 1]")]:
        assert_user_error(*call(entry, args), fragment)
    assert files_under(tmp_path) == []


def test_every_tampered_or_missing_engine_file_is_refused(tmp_path):
    """verify_engine_files (what every backend calls before loading) refuses each engine file of the manifest,
    rollouts included, when one byte changes or the file is gone, naming the file."""
    from fastardiff.errors import EngineError
    from fastardiff.runtime.manifest import load_manifest, verify_engine_files

    d = write_manifest_dict(tmp_path / "eng", fake_manifest(tmp_path / "eng"))
    manifest = load_manifest(d)
    verify_engine_files(d, manifest)
    for name, entry in manifest.engines.items():
        path = d / entry.file
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(EngineError, match="sha256") as err:
            verify_engine_files(d, manifest)
        assert entry.file in str(err.value), name
        path.unlink()
        with pytest.raises(EngineError, match="missing"):
            verify_engine_files(d, manifest)
        path.write_bytes(original)
    verify_engine_files(d, manifest)


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti", "tensorrt"])
def test_backends_verify_hashes_before_loading(backend, tmp_path, monkeypatch):
    """Each backend refuses a tampered engine by its sha256 before handing the file to its loader (the fake
    files are not loadable: a backend that skipped the check would fail later, with another message).
    TensorRT: a stand-in module with the API's Builder attribute (the check runs before any TensorRT call)."""
    import sys
    import types

    from fastardiff.errors import EngineError
    from fastardiff.runtime.engine import load_engines

    if backend == "tensorrt":
        monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.16.1", Builder=object))
    else:
        pytest.importorskip("onnxruntime" if backend == "onnxruntime" else "torch")
    d = write_manifest_dict(tmp_path / "eng", fake_manifest(tmp_path / "eng", backend=backend))
    (d / "decoder.onnx").write_bytes(b"tampered")
    with pytest.raises(EngineError, match="sha256"):
        load_engines(d)


# ---------------------------------------------------------------------------------------------------------------
# regressions found by benchmarks/bad_inputs.py (each one: one `error:` line, exit 2, nothing written)


@pytest.mark.parametrize("target", ["onnx", "aoti"])
def test_export_device_cuda_without_cuda_is_a_user_error(target, tmp_path, random_checkpoint_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert_user_error(*call(export_main, ["--ckpt", str(random_checkpoint_path), "--target", target, "--out", "e",
                                          "--device", "cuda"]), "--device cuda", "use --device cpu")
    assert files_under(tmp_path) == []


def test_refused_export_leaves_no_new_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(*call(export_main, ["--ckpt", "missing.pt", "--target", "onnx", "--out", "new/sub/e"]),
                      "'missing.pt' does not exist")
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("args, fragment", [
    (["--recipe", "tiny-mnist-small", "--out", "new/t", "--resume"], "--resume given but"),
    (["--recipe", "mar-b-like", "--out", "new/t"], "does not ship here"),
    (["--recipe", "tiny-mnist-fast-ardiff-small", "--out", "new/t", "--stages", "teacher,nope"], "unknown stages"),
], ids=["resume-without-state", "recipe-without-data", "fast-ardiff-bad-stage"])
def test_refused_training_leaves_no_out_dir(args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(*call(main, ["train", "--no-progress"] + args), fragment)
    assert files_under(tmp_path) == []


def test_corrupt_resume_state_is_a_user_error(tmp_path):
    (tmp_path / "resume-state.pt").write_text("not a training state")
    before = files_under(tmp_path)
    assert_user_error(*call(main, ["train", "--recipe", "tiny-mnist-small", "--out", str(tmp_path), "--resume",
                                   "--no-progress"]), "not a readable training state", "start without --resume")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("args, fragment", [
    (["--n", "x"], "argument --n: expected comma-separated integers"),
    (["--dtype", "int4"], "argument --dtype: invalid choice"),
    (["--bogus"], "unrecognized arguments: --bogus"),
], ids=["n-not-a-list", "unknown-dtype", "unknown-option"])
def test_bench_kernels_usage_errors_are_one_error_line(args, fragment):
    assert_user_error(*call(main, ["bench", "kernels"] + args), fragment, "see `fastardiff bench kernels --help`")


def test_engine_dir_that_is_a_file_and_non_checkpoint_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("x")
    assert_user_error(*call(run_main, ["--engine", "afile", "--prompt", "3"]), "'afile' is a file, not an engine "
                      "directory", "fastardiff-export --out DIR")
    assert_user_error(*call(run_main, ["--ckpt", "afile", "--prompt", "3"]), "not a readable fastardiff checkpoint",
                      "pass a .pt file written by `fastardiff train`")
    assert files_under(tmp_path) == [tmp_path / "afile"]
