"""Issue 36 (CLI side): outputs never replace inputs, non-regular input files are refused without being opened,
absurd manifests and foreign checkpoints are one clear error, requests are fitted to the engines' batch profile,
and a stuck decoding loop fails instead of spinning."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastardiff.cli import main, run_main


def call(entry, args, capsys):
    try:
        entry(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(code, err, *fragments):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def digest_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def engines_copy(shared_onnx_export, tmp_path_factory):
    """A private copy of the shared ONNX export (tests may link to its files and edit its manifest)."""
    out = tmp_path_factory.mktemp("engines") / "eng"
    shutil.copytree(shared_onnx_export[0], out)
    return out


def edited_copy(source: Path, dest: Path, edit) -> Path:
    shutil.copytree(source, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    edit(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


# ---------------------------------------------------------------------------------------------------------------
# outputs that are inputs


def test_run_inputs_know_paths_links_and_directories(tmp_path):
    from fastardiff.errors import OutputError
    from fastardiff.runtime.files import RunInputs

    model = tmp_path / "d" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"x")
    os.link(model, tmp_path / "hard.pt")
    (tmp_path / "soft.pt").symlink_to(model)
    inputs = RunInputs().add(model, "the checkpoint")
    for same in (model, tmp_path / "hard.pt", tmp_path / "soft.pt", tmp_path / "d" / ".." / "d" / "model.pt"):
        with pytest.raises(OutputError, match="is the checkpoint"):
            inputs.refuse_output(same, "--out")
    with pytest.raises(OutputError, match="contains the checkpoint"):
        inputs.refuse_output(tmp_path, "--out", is_dir=True)
    inputs.refuse_output(tmp_path, "--out")                     # a file output named like the dir: no clash
    inputs.refuse_output(tmp_path / "d" / "other.pt", "--out")
    inputs.refuse_output(tmp_path / "elsewhere", "--out", is_dir=True)


def test_write_primitives_refuse_protected_inputs(tmp_path):
    """StagedOutputs, the atomic JSON writer and the rename primitive refuse an input of the running command."""
    from fastardiff.errors import OutputError
    from fastardiff.runtime.atomic import replace_keeping_backup
    from fastardiff.runtime.files import RunInputs, protected
    from fastardiff.runtime.images import StagedOutputs
    from fastardiff.runtime.stats import write_text_atomic

    source = tmp_path / "in.json"
    source.write_text("keep me")
    other = tmp_path / "new.json"
    other.write_text("new")
    built = tmp_path / "built"                   # a directory that would replace tmp_path, which holds the input
    built.mkdir()
    with protected(RunInputs().add(source, "an input")):
        with StagedOutputs() as staged, pytest.raises(OutputError, match="is an input"):
            staged.path_for(source)
        with pytest.raises(OutputError, match="is an input"):
            write_text_atomic(source, "clobbered")
        with pytest.raises(OutputError, match="contains an input"):
            replace_keeping_backup(built, tmp_path, tmp_path.parent / "aside")
        with pytest.raises(OutputError):
            replace_keeping_backup(other, source, tmp_path / "aside")
    assert source.read_text() == "keep me" and other.read_text() == "new"
    write_text_atomic(source, "now allowed")                    # outside the block nothing is protected
    assert source.read_text() == "now allowed"


@pytest.mark.parametrize("case", ["stats-is-manifest", "out-is-engine-file", "stats-is-hard-link-of-manifest",
                                  "out-is-symlink-to-manifest", "stats-is-plan-cache"])
def test_run_refuses_outputs_that_are_its_inputs(case, engines_copy, tmp_path, capsys, monkeypatch):
    from fastardiff.runtime import speculative

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(speculative, "generate", lambda *a, **k: pytest.fail("generated before the refusal"))
    eng = engines_copy
    args = ["--engine", str(eng), "--prompt", "3", "--gamma", "1", "--mode", "target"]
    if case == "stats-is-manifest":
        args += ["--stats-json", str(eng / "manifest.json")]
    elif case == "out-is-engine-file":
        args += ["--out", str(eng / "decoder.onnx")]
    elif case == "stats-is-hard-link-of-manifest":
        os.link(eng / "manifest.json", tmp_path / "linked.json")
        args += ["--stats-json", "linked.json"]
    elif case == "out-is-symlink-to-manifest":
        (tmp_path / "grid.png").symlink_to(eng / "manifest.json")
        args += ["--out", "grid.png"]
    else:
        plans = Path(os.environ["FASTARDIFF_CACHE_DIR"])
        plans.mkdir(parents=True, exist_ok=True)
        plan = plans / "0000-test-plan.json"
        plan.write_text("{}")
        args += ["--stats-json", str(plan)]
    before = digest_tree(eng)
    code, _, err = call(run_main, args, capsys)
    one_error(code, err, "which this command reads", "choose another path")
    assert digest_tree(eng) == before
    assert not [p for p in tmp_path.iterdir() if p.name not in ("linked.json", "grid.png")]


def test_run_refuses_an_out_dir_image_that_would_replace_its_checkpoint(random_checkpoint_path, tmp_path, capsys,
                                                                         monkeypatch):
    """--out-dir: the names of the images are known before generating; one that is the checkpoint is refused."""
    from fastardiff.runtime import speculative

    monkeypatch.setattr(speculative, "generate", lambda *a, **k: pytest.fail("generated before the refusal"))
    ckpt = tmp_path / "0000-three.png"
    shutil.copy(random_checkpoint_path, ckpt)
    before = ckpt.read_bytes()
    code, _, err = call(run_main, ["--ckpt", str(ckpt), "--prompt", "3", "--out-dir", str(tmp_path), "--gamma", "1",
                                   "--out", str(tmp_path / "grid.png")], capsys)
    one_error(code, err, "--out-dir", "the checkpoint")
    assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["0000-three.png"]


def test_export_refuses_an_out_dir_holding_its_checkpoint(random_checkpoint_path, tmp_path, capsys):
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(random_checkpoint_path, d / "model.pt")
    before = digest_tree(d)
    for out in (d, tmp_path):
        code, _, err = call(main, ["export", "--ckpt", str(d / "model.pt"), "--target", "onnx", "--out", str(out)],
                            capsys)
        one_error(code, err, "--out", "contains the checkpoint")
    assert digest_tree(d) == before


def test_train_refuses_an_out_dir_holding_its_init_checkpoint(random_checkpoint_path, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(random_checkpoint_path, out / "tiny-mnist.pt")
    before = digest_tree(out)
    code, _, err = call(main, ["train", "--stage", "draft-onpolicy", "--init", str(out / "tiny-mnist.pt"), "--out",
                               str(out), "--steps", "1", "--samples", "2", "--no-progress"], capsys)
    one_error(code, err, "--out", "contains --init checkpoint")
    assert digest_tree(out) == before


# ---------------------------------------------------------------------------------------------------------------
# non-regular input files: refused from a stat, never opened (a FIFO would block the open forever)


@pytest.fixture
def fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "model.pt"
    os.mkfifo(path)
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", [["info", "--ckpt"], ["export", "--target", "onnx", "--out", "{tmp}/e", "--ckpt"],
                                     ["calibrate", "--ckpt"], ["run", "--prompt", "3", "--ckpt"],
                                     ["eval", "--n", "2", "--ckpt"]])
def test_fifo_as_checkpoint_is_refused_without_opening_it(command, fifo, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in command] + [str(fifo)]
    code, _, err = call(main, args, capsys)
    one_error(code, err, "is a FIFO (named pipe), not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["manifest.json", "decoder.onnx"])
def test_fifo_in_an_engine_dir_is_refused_without_opening_it(name, engines_copy, tmp_path, capsys):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    eng = tmp_path / "eng"
    shutil.copytree(engines_copy, eng)
    (eng / name).unlink()
    os.mkfifo(eng / name)
    code, _, err = call(run_main, ["--engine", str(eng), "--prompt", "3", "--gamma", "1",
                                   "--out", str(tmp_path / "x.png")], capsys)
    one_error(code, err, "is a FIFO (named pipe), not a regular file")


def test_regular_file_names_the_kind(tmp_path):
    from fastardiff.runtime.files import InputFileError, regular_file

    with pytest.raises(InputFileError, match="is a directory, not a regular file"):
        regular_file(tmp_path, "checkpoint")
    with pytest.raises(InputFileError, match="does not exist"):
        regular_file(tmp_path / "nope", "checkpoint")
    with pytest.raises(InputFileError, match="is a character device"):
        regular_file("/dev/null", "checkpoint")
    (tmp_path / "f").write_text("x")
    assert regular_file(tmp_path / "f", "checkpoint") == tmp_path / "f"


# ---------------------------------------------------------------------------------------------------------------
# absurd manifests: refused at load, naming the field


def _set(path, value):
    def edit(manifest):
        *parents, last = path.split(".")
        for key in parents:
            manifest = manifest[key]
        manifest[last] = value
    return edit


ABSURD = {
    "image-size-1e30": (_set("config.image_size", 10 ** 30), "config.image_size"),
    "image-size-float-1e30": (_set("config.image_size", 1e30), "config.image_size"),
    "e-max-1e308": (_set("calibration.e_max", 1e308), "calibration.e_max"),
    "e-max-over-tau": (_set("config.tau_sigma", 0.01), "calibration.e_max"),
    "heads-zero": (_set("config.heads", 0), "config.heads"),
    "width-negative": (_set("config.width", -64), "config.width"),
    "max-batch-huge": (_set("max_batch", 10 ** 12), "max_batch"),
    "profile-negative": (lambda m: m["engines"]["decoder"]["profile"].update(batch=[-1, 1, 8]),
                         "engines.decoder.profile"),
    "tau-static-huge": (_set("calibration.tau_static", 1e200), "calibration.tau_static"),
    "sigma-max-inf": (_set("config.sigma_max", float("inf")), "config.sigma_max"),
}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_manifest_values_are_refused_at_load(case, engines_copy, tmp_path):
    from fastardiff.errors import EngineError
    from fastardiff.runtime.manifest import load_manifest

    edit, field_name = ABSURD[case]
    eng = edited_copy(engines_copy, tmp_path / "eng", edit)
    with pytest.raises(EngineError, match=f"field '{field_name}"):
        load_manifest(eng)


@pytest.mark.parametrize("field_name, value", [("heads", None), ("token_dim", None)])
def test_manifest_config_not_matching_the_engine_files_is_refused(field_name, value, engines_copy, tmp_path, capsys):
    """heads (still dividing width) and token_dim changed in the manifest only: the engine files' input dims
    disagree, which the loader reports naming the config field, before any call."""
    config = json.loads((engines_copy / "manifest.json").read_text())["config"]
    new = config["heads"] * 2 if field_name == "heads" else config["token_dim"] * 2
    eng = edited_copy(engines_copy, tmp_path / "eng", _set(f"config.{field_name}", new))
    code, _, err = call(run_main, ["--engine", str(eng), "--prompt", "3", "--gamma", "1", "--mode", "target",
                                   "--out", str(tmp_path / "x.png")], capsys)
    one_error(code, err, f"config.{field_name}", "does not describe these engine files")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# engines smaller than the request


@pytest.fixture(scope="module")
def batch_one_engines(engines_copy, tmp_path_factory):
    """The shared export described as a batch-1 export (max_batch 1, every batch profile topped at 1): what
    `fastardiff-export --batch 1` writes, without a second export."""
    def edit(m):
        m["max_batch"] = 1
        for entry in m["engines"].values():
            if "batch" in entry.get("profile", {}):
                entry["profile"]["batch"] = [1, 1, 1]
    return edited_copy(engines_copy, tmp_path_factory.mktemp("b1") / "eng", edit)


def test_max_batch_rows_is_the_smallest_engine_profile(batch_one_engines, engines_copy):
    from fastardiff.runtime.manifest import load_manifest

    assert load_manifest(batch_one_engines).max_batch_rows == 1
    full = load_manifest(engines_copy)
    assert full.max_batch_rows == min([full.max_batch] + [e.profile["batch"][-1] for e in full.engines.values()
                                                          if e.profile.get("batch")])
    full.engines["decoder"].profile["batch"] = [1, 2, 3]
    assert full.max_batch_rows == 3


def test_guidance_on_batch_one_engines_is_refused_before_generating(batch_one_engines, tmp_path, capsys,
                                                                    monkeypatch):
    from fastardiff.runtime import speculative

    monkeypatch.setattr(speculative, "generate", lambda *a, **k: pytest.fail("generated before the refusal"))
    for extra in (["--gamma", "1"], ["--mode", "target", "--gamma", "1"], []):
        code, _, err = call(run_main, ["--engine", str(batch_one_engines), "--prompt", "3", "--cfg-scale", "2",
                                       "--out", str(tmp_path / "x.png"), *extra], capsys)
        one_error(code, err, "--cfg-scale 2", "at most 1 row", "--batch 2")
    assert not (tmp_path / "x.png").exists()


def test_every_engine_call_fits_the_profile(batch_one_engines, engines_copy):
    """More images than the engines take per call: every call gets at most max_batch_rows rows (counted on every
    engine entry point), and the run equals the same run of the unrestricted engines split the same way."""
    from fastardiff.runtime.engine import load_engines
    from fastardiff.runtime.speculative import GenerationConfig, generate

    small = load_engines(batch_one_engines)
    rows = []
    real_run = small._run                       # every engine call of the backend goes through _run
    small._run = lambda name, arrays: (rows.append(len(arrays[0])), real_run(name, arrays))[1]
    classes = np.array([3, 1, 4])
    for gen in (GenerationConfig(mode="target", seed=2), GenerationConfig(draft="jacobi", gamma=2, seed=2)):
        rows.clear()
        images, stats = generate(small, classes, gen)
        assert rows and max(rows) == 1 and stats.decode_calls == 3 and images.shape[0] == 3
        same, _ = generate(load_engines(engines_copy), classes, gen, max_batch=1)
        np.testing.assert_array_equal(images, same)


# ---------------------------------------------------------------------------------------------------------------
# foreign checkpoints and out-of-range requests: one clear error, the checkpoint untouched


def _copy(path, tmp_path, name="model.pt") -> Path:
    dest = tmp_path / name
    shutil.copy(path, dest)
    if Path(path).with_suffix(".json").exists():
        shutil.copy(Path(path).with_suffix(".json"), dest.with_suffix(".json"))
    return dest


@pytest.fixture(scope="module")
def fast_ardiff_checkpoint_path():
    from fastardiff.recipes.checkpoint import default_checkpoint_path

    path = default_checkpoint_path().with_name("tiny-mnist-fast-ardiff.pt")
    assert path.exists()
    return path


def test_calibrate_refuses_a_fast_ardiff_checkpoint_and_leaves_it(fast_ardiff_checkpoint_path, tmp_path, capsys):
    ckpt = _copy(fast_ardiff_checkpoint_path, tmp_path)
    before = digest_tree(tmp_path)
    code, _, err = call(main, ["calibrate", "--ckpt", str(ckpt), "--images", "10"], capsys)
    one_error(code, err, "fast-ardiff checkpoint", "drift-ar")
    assert digest_tree(tmp_path) == before


@pytest.mark.parametrize("args, fragment", [(["--jacobi-windows", "2,1000"], "--jacobi-windows: window 1000"),
                                            (["--jacobi-windows", "64"], "--jacobi-windows: window 64"),
                                            (["--gamma", "16", "--measure", "model"], None)])
def test_calibrate_window_bounds_name_the_option_and_keep_the_checkpoint(args, fragment, random_checkpoint_path,
                                                                         tmp_path, capsys, monkeypatch):
    from fastardiff.exporter import calibrate

    ckpt = _copy(random_checkpoint_path, tmp_path)
    before = digest_tree(tmp_path)
    if fragment is None:           # in range (tiny-mnist: N = 64): it would measure; stop it there
        monkeypatch.setattr(calibrate, "measure_position_acceptance",
                            lambda *a, **k: (_ for _ in ()).throw(calibrate.click.UsageError("measured")))
        code, _, err = call(main, ["calibrate", "--ckpt", str(ckpt), *args], capsys)
        assert "measured" in err
    else:
        code, _, err = call(main, ["calibrate", "--ckpt", str(ckpt), *args], capsys)
        one_error(code, err, fragment, "1..63")
    assert digest_tree(tmp_path) == before


def test_draft_onpolicy_refuses_a_fast_ardiff_init(fast_ardiff_checkpoint_path, tmp_path, capsys):
    code, _, err = call(main, ["train", "--stage", "draft-onpolicy", "--init", str(fast_ardiff_checkpoint_path),
                               "--out", str(tmp_path / "out"), "--steps", "1", "--samples", "2", "--no-progress"],
                        capsys)
    one_error(code, err, "fast-ardiff checkpoint", "--stage draft-onpolicy")
    assert not (tmp_path / "out").exists()


def test_options_are_named_in_their_own_errors(engines_copy, tmp_path, capsys):
    """A length past the benchmark's range names --jacobi (not the export's --gamma it becomes); a temperature too
    small for float32 names --temperature (not the engine)."""
    code, _, err = call(main, ["bench", "pipeline", "--jacobi", "1000", "--no-export", "--no-torch"], capsys)
    one_error(code, err, "--jacobi '1000'", "1..32")
    code, _, err = call(run_main, ["--engine", str(engines_copy), "--prompt", "3", "--gamma", "1", "--mode", "target",
                                   "--temperature", "1e-30", "--out", str(tmp_path / "x.png")], capsys)
    one_error(code, err, "--temperature 1e-30", "--temperature 1e-06 or more")


# ---------------------------------------------------------------------------------------------------------------
# a stuck loop fails


def test_a_loop_without_progress_raises_instead_of_spinning():
    from fastardiff.runtime.generation import LoopStalled, next_round, round_limit

    limit = round_limit(np.array([0, 60]), 64)
    assert limit == 65
    rounds = 0
    with pytest.raises(LoopStalled, match="Jacobi loop ran 65 rounds"):
        for _ in range(1000):
            rounds = next_round(rounds, limit, "Jacobi")
    assert rounds == limit


@pytest.mark.parametrize("settings", [{"draft": "model", "gamma": 2}, {"draft": "jacobi", "gamma": 2},
                                      {"draft": "jacobi", "gamma": 2, "alternative": "target"}])
def test_both_decoding_loops_are_bounded(settings, engines_copy, monkeypatch):
    """Each decoding loop (one proposal kind, or the adaptive loop over two) counts its rounds against round_limit:
    with the limit cut to 2 rounds (a loop that stopped emitting tokens would reach any limit), the run fails with
    LoopStalled instead of going on."""
    import importlib

    from fastardiff.runtime.engine import load_engines
    from fastardiff.runtime.generation import LoopStalled
    from fastardiff.runtime.speculative import GenerationConfig, generate

    monkeypatch.setattr(importlib.import_module("fastardiff.runtime.adaptive"), "round_limit", lambda n, total: 2)
    with pytest.raises(LoopStalled, match="ran 2 rounds"):
        generate(load_engines(engines_copy), np.array([3]), GenerationConfig(seed=0, **settings))


@pytest.mark.timeout(60)
def test_a_fifo_where_the_plan_cache_reads_costs_only_a_retiming(tmp_path, monkeypatch):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    from fastardiff.runtime import plan_cache

    monkeypatch.setenv("FASTARDIFF_CACHE_DIR", str(tmp_path))
    key = {"engines": "test", "batch": 1}
    path = plan_cache.plan_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    assert plan_cache.load_plan(key) is None
