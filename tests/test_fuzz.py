"""Property-based fuzzing (hypothesis) of the manifest, the run / export flag spaces and the prompt parser:
every input either works or gives exactly one `error:` line with exit status 2, and a failed command writes
nothing. Bounded for CI: few examples per property, no per-example deadline, no example database."""
from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fastardiff.cli import export_main, run_main
from fastardiff.errors import EngineError
from fastardiff.runtime.manifest import MANIFEST_NAME, Manifest, load_manifest
from fastardiff.runtime.prompts import PromptError, parse_prompts
from test_reliability import (FakeEngines, call, error_lines, fake_generate, fake_manifest, files_under,
                              write_manifest_dict)

FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)), max_leaves=12)


def _paths(d, prefix=()):
    """Every key path into nested dicts/lists of a manifest."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _mutate(data, path, action, value):
    target = data
    for k in path[:-1]:
        target = target[k]
    if action == "delete":
        del target[path[-1]]
    elif action == "retype" and isinstance(target[path[-1]], (int, float)) and not isinstance(target[path[-1]], bool):
        target[path[-1]] = str(target[path[-1]])
    else:
        target[path[-1]] = value


@pytest.fixture(scope="module")
def engine_dir_and_manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-engines")
    return d, fake_manifest(d)


@FUZZ
@given(data=st.data())
def test_fuzzed_manifest_loads_or_is_one_engine_error(engine_dir_and_manifest, data):
    engine_dir, valid = engine_dir_and_manifest
    manifest = copy.deepcopy(valid)
    paths = sorted(_paths(manifest), key=repr)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = sorted(_paths(manifest), key=repr)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        action = data.draw(st.sampled_from(["delete", "set", "retype"]), label="action")
        _mutate(manifest, path, action, data.draw(json_values, label="value"))
    (engine_dir / MANIFEST_NAME).write_text(json.dumps(manifest))   # NaN/Infinity as JSON extensions
    try:
        m = load_manifest(engine_dir)
    except EngineError as err:
        assert "\n" not in str(err) and str(err), str(err)
        event("rejected")
        return
    event("accepted")
    # accepted: it must be usable by what the runtime reads
    assert {"draft_step", "target_verify", "decoder"} <= set(m.engines)
    c = m.config
    assert c["width"] % c["heads"] == 0 and c["image_size"] % c["patch"] == 0
    assert len(c["class_names"]) == c["num_classes"] and math.isfinite(m.calibration["e_max"])
    assert m.gamma >= 1 and m.max_batch >= 1 and all(e.gamma >= 1 for e in m.engines.values()
                                                     if e.kind == "draft_rollout")


@FUZZ
@given(document=json_values)
def test_arbitrary_json_is_never_a_crash(engine_dir_and_manifest, document):
    engine_dir, _ = engine_dir_and_manifest
    if isinstance(document, dict) and document:
        document = {"format_version": 1, **document}
    with pytest.raises(EngineError):
        Manifest.from_dict(document, "fuzz")


# --- fastardiff-run flags ---------------------------------------------------------------------------------------

number_text = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "0", "-0", "1", "1.5", "-1", "1e309", "100", "0x10", "1_0", "", " ",
                     "2", "4", "20", "20.0001", "99.99", "4294967295", "4294967296", "٣", "1e-320"]),
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr))
prompt_text = st.one_of(st.sampled_from(["3", "seven", "3,7 nine", "", ",", "ten", "-1", "10", "SEVEN", "+3",
                                         "3,,7", "٣", "²"]),
                        st.text(alphabet=st.sampled_from(list("0123456789, -+abcdefghijklmnopqrstuvwxyz\t")),
                                max_size=16))
# valid values for each number flag (drawn half the time; the other half from number_text)
RUN_NUMBER_FLAGS = {
    "--temperature": st.floats(0.05, 10.0).map(repr), "--cfg": st.floats(0.0, 20.0).map(repr),
    "--eta": st.floats(0.0, 99.0).map(repr), "--seed": st.integers(0, 2**32 - 1).map(str),
    "--num-images": st.integers(1, 6).map(str), "--gamma": st.sampled_from(["1", "2", "3", "auto"]),
}
valid_prompts = st.sampled_from(["3", "seven", "3,7 nine", "SEVEN", "+3", "3,,7", "0 1 2 3 4"])


@st.composite
def run_flags(draw):
    flags = ["--prompt", draw(st.one_of(valid_prompts, prompt_text), label="prompt")]
    for flag, valid in RUN_NUMBER_FLAGS.items():
        if draw(st.booleans()):
            flags += [flag, draw(st.one_of(valid, number_text), label=flag)]
    if draw(st.booleans()):
        flags += ["--early-stop", draw(st.sampled_from(["static", "context", "off", "sometimes"]))]
    if draw(st.booleans()):
        flags += ["--mode", draw(st.sampled_from(["speculative", "target", "draft"]))]
    if draw(st.booleans()):
        flags += ["--draft", draw(st.sampled_from(["auto", "model", "jacobi", "eagle"]))]
    if draw(st.booleans()):
        flags += ["--coupling", draw(st.sampled_from(["on", "off", "maybe"]))]
    outputs = draw(st.sets(st.sampled_from(["--out", "--out-dir", "--stats-json"]), min_size=1))
    return flags, sorted(outputs)


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-run-engines")
    write_manifest_dict(d, fake_manifest(d))
    return d


@FUZZ
@given(case=run_flags())
def test_fuzzed_run_flags_work_or_fail_cleanly(run_env, case, monkeypatch):
    import fastardiff.runtime.cli as run_cli
    import fastardiff.runtime.gamma_auto as gamma_auto
    import fastardiff.runtime.speculative as speculative

    flags, outputs = case
    monkeypatch.setattr(run_cli, "_load", lambda e, c, dev: FakeEngines(load_manifest(e)))
    monkeypatch.setattr(speculative, "generate", fake_generate)
    monkeypatch.setattr(gamma_auto, "choose_gamma", lambda engines, batch, cfg, **kw: gamma_auto.GammaChoice(
        gamma=2, reason="fuzz"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        names = {"--out": out / "grid.png", "--out-dir": out / "imgs", "--stats-json": out / "s.json"}
        args = ["--engine", str(run_env)] + flags
        for o in outputs:
            args += [o, str(names[o])]
        code, stdout, err = call(run_main, args)
        assert "Traceback" not in err and "internal error" not in err, (args, err)
        event(f"exit {code}")
        if code == 0:
            for o in outputs:
                assert names[o].exists(), (args, o)
            assert not [p for p in out.rglob(".*")], "staging left behind"
        else:
            lines = [line for line in error_lines(err) if not line.startswith(("gamma auto", "  "))]
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
            assert files_under(out) == [], args


# --- fastardiff-export flags ------------------------------------------------------------------------------------

@st.composite
def export_flags(draw):
    flags = ["--target", draw(st.sampled_from(["onnx", "aoti", "trt", "tflite", "", "ONNX"]))]
    for flag, values in (("--precision", ["fp32", "fp16", "bf16", "int8"]), ("--device", ["cpu", "cuda", "tpu"]),
                         ("--batch", ["0", "1", "8", "9", "x", "-1"]), ("--gamma", ["0", "1", "32", "33", "four"]),
                         ("--atol", ["1e-4", "nan", "-1", "inf", "2", "0"]),
                         ("--rtol", ["1e-3", "nan", "-0.1", "1", "1.01"])):
        if draw(st.booleans()):
            flags += [flag, draw(st.sampled_from(values), label=flag)]
    if draw(st.booleans()):
        flags.append("--force")
    return flags


@pytest.fixture(scope="module")
def export_manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-export-engines")
    return d, fake_manifest(d)


@FUZZ
@given(flags=export_flags())
def test_fuzzed_export_flags_work_or_fail_cleanly(flags, monkeypatch, random_checkpoint_path, export_manifest):
    """The export itself is replaced (it is tested in test_export_*); everything before it is real."""
    import fastardiff.exporter.export as export

    built = []
    _, valid = export_manifest

    def fake_export(ckpt, out, opts, model=None, draft_ckpt=None):
        from fastardiff.exporter.targets import get_target

        get_target(opts.target)      # unknown target, missing dependency: as the real export
        built.append(opts)
        return Manifest.from_dict(copy.deepcopy(valid)), False

    monkeypatch.setattr(export, "export_engines", fake_export)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engines"
        code, stdout, err = call(export_main, ["--ckpt", str(random_checkpoint_path), "--out", str(out)] + flags)
        assert "Traceback" not in err and "internal error" not in err, (flags, err)
        event(f"exit {code}")
        if code == 0:
            assert built and "built:" in stdout
            opts = built[0]
            assert 1 <= opts.max_batch <= 8 and 1 <= opts.gamma <= 32
            assert 0 <= opts.atol <= 1 and 0 <= opts.rtol <= 1
        else:
            lines = error_lines(err)
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (flags, err)
            assert not built or "tensorrt" in lines[0] or "not installed" in lines[0]
            assert not out.exists() or not built


# --- prompt parser ----------------------------------------------------------------------------------------------

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(prompt=st.text(max_size=40), num_images=st.one_of(st.none(), st.integers(-3, 50)))
def test_fuzzed_prompts_parse_or_are_one_prompt_error(prompt, num_images):
    try:
        ids = parse_prompts(prompt, NAMES, num_images)
    except PromptError as err:
        assert "\n" not in str(err) or "\n" in prompt
        return
    assert ids and all(0 <= i < len(NAMES) for i in ids)
    if num_images is not None:
        assert len(ids) == num_images


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(ids=st.lists(st.integers(0, 9), min_size=1, max_size=12), as_names=st.lists(st.booleans(), min_size=12),
       seps=st.lists(st.sampled_from([",", " ", ", ", "\t", " ,"]), min_size=12))
def test_prompt_round_trip(ids, as_names, seps):
    parts = [NAMES[i].upper() if named else str(i) for i, named in zip(ids, as_names)]
    prompt = "".join(p + s for p, s in zip(parts, seps))
    assert parse_prompts(prompt, NAMES) == ids
    assert parse_prompts(prompt, NAMES, 2 * len(ids)) == ids + ids
