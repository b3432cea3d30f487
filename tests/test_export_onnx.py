"""ONNX export: manifest, parity, engine cache, atomic writes, the onnxruntime backend, and runs without torch.

One real ONNX export per session (the `onnx_engine_dir` fixture); orchestration cases (--force, failures)
use a fast in-test target that copies those engine files, so they exercise export.py without re-tracing."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastardiff.errors import EngineError
from fastardiff.exporter import targets
from fastardiff.exporter.engine_modules import ENGINE_IO, example_inputs, make_engine_modules
from fastardiff.exporter.export import export_engines
from fastardiff.exporter.parity import ParityError, compare_arrays
from fastardiff.exporter.targets import ExportOptions, TargetResult, library_versions
from fastardiff.runtime.engine import IN_PLACE_ENGINES, load_engines, per_layer_io
from fastardiff.runtime.manifest import ENGINE_NAMES, EngineEntry, load_manifest, sha256_file
from same_run import assert_same_run, generate_on_both

pytestmark = pytest.mark.slow
from conftest import SHARED_ONNX_GAMMA as ONNX_GAMMA  # noqa: E402  rollouts 1..2 of the shared export


@pytest.fixture(scope="session")
def export_ckpt_path(shipped_checkpoint_path):
    """Issue 6 exports the shipped model."""
    return shipped_checkpoint_path


@pytest.fixture(scope="session")
def onnx_export(shared_onnx_export):
    """The run's shared export of the shipped model (tests/conftest.py; test_serve.py serves the same engines)."""
    return shared_onnx_export


@pytest.fixture(scope="session")
def onnx_engine_dir(onnx_export):
    return onnx_export[0]


@pytest.fixture
def copy_target(monkeypatch, onnx_engine_dir):
    """Registers target 'copy': writes the session's ONNX engines into work_dir (counting builds), or fails
    half-way when `fail` is set, to test the orchestration (cache, --force, atomic replace) quickly."""
    state = {"builds": 0, "fail": False}
    source = load_manifest(onnx_engine_dir)

    def build_copy(ckpt, work_dir: Path, opts):
        state["builds"] += 1
        engines = {}
        for name in source.engines:
            entry = source.engines[name]
            shutil.copy(onnx_engine_dir / entry.file, work_dir / entry.file)
            if state["fail"] and name == "target_verify":
                raise ParityError("engine 'target_verify' differs from the PyTorch reference (test)")
            engines[name] = EngineEntry(**{**entry.__dict__, "sha256": sha256_file(work_dir / entry.file)})
        return TargetResult(backend="onnxruntime", engines=engines, library_versions={})

    module = type(sys)("fastardiff_test_copy_target")
    module.build_copy = build_copy
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(targets.TARGETS, "copy", f"{module.__name__}:build_copy")
    monkeypatch.setitem(targets.TARGET_LIBRARIES, "copy", ("onnxruntime",))
    return state


def test_export_writes_manifest_with_hashes_and_parity(onnx_export, export_ckpt_path, shipped_checkpoint):
    tiny_config = shipped_checkpoint.config
    out, manifest, hit = onnx_export
    assert not hit
    rollouts = [f"draft_rollout_{g}.onnx" for g in range(1, ONNX_GAMMA + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(["decoder.onnx", "draft_step.onnx", "manifest.json",
                                                            "target_jacobi.onnx", "target_verify.onnx"] + rollouts)
    assert manifest.rollout_engines() == {g: f"draft_rollout_{g}" for g in range(1, ONNX_GAMMA + 1)}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"
    data = json.loads((out / "manifest.json").read_text())
    assert data["format_version"] == 1 and data["backend"] == "onnxruntime" and data["family"] == "drift-ar"
    assert data["config"] == tiny_config.to_dict() and data["config_hash"] == tiny_config.config_hash()
    assert data["precision"] == "fp32" and data["device"] == "cpu" and data["max_batch"] == 8 and data["gamma"] == ONNX_GAMMA
    assert "e_max" in data["calibration"] and "tau_global" in data["calibration"]
    for lib in ("torch", "onnx", "onnxruntime", "numpy"):
        assert data["library_versions"][lib] == library_versions([lib])[lib]
    assert data["export"]["checkpoint_sha256"] == sha256_file(export_ckpt_path)
    for name in list(ENGINE_NAMES) + [f"draft_rollout_{g}" for g in range(1, ONNX_GAMMA + 1)]:
        entry = data["engines"][name]
        assert entry["sha256"] == sha256_file(out / entry["file"])
        # the default (--kv-update auto) onnx AR engines update per-layer cache buffers in place
        layers = entry["cache_layers"]
        assert layers == (0 if name not in IN_PLACE_ENGINES else tiny_config.draft_layers if name == "draft_step"
                          else tiny_config.target_layers)
        want_io = per_layer_io(*ENGINE_IO[name], layers) if layers else tuple(map(list, ENGINE_IO[name]))
        assert (entry["inputs"], entry["outputs"]) == want_io
        assert entry["profile"]["batch"] == [1, 4, 8]
        assert entry["kind"] == ("draft_rollout" if "rollout" in name else name)
        parity = entry["parity"]
        assert set(parity["outputs"]) == set(ENGINE_IO[name][1])
        assert [1, 8] == [min(s[0] for s in parity["shapes"]), max(s[0] for s in parity["shapes"])]
        for stats in parity["outputs"].values():
            assert stats["mismatches"] == 0 and stats["max_abs"] <= 1e-4, (name, stats)
    assert data["engines"]["target_verify"]["profile"]["K"][1] == ONNX_GAMMA + 1
    assert data["engines"]["target_jacobi"]["residual"] == "reflected"


def test_every_gelu_is_one_gelu_node(onnx_engine_dir, shipped_checkpoint):
    """The onnx target's fuse_gelu pass left no Erf chain: one Gelu per MLP in each engine (the parity above ran on
    these files)."""
    import onnx

    cfg = shipped_checkpoint.config
    mlps = {"target_verify": cfg.target_layers, "target_jacobi": cfg.target_layers, "draft_step": cfg.draft_layers,
            "decoder": cfg.decoder_layers, "draft_rollout_1": cfg.draft_layers}
    for name, count in mlps.items():
        ops = [n.op_type for n in onnx.load(str(onnx_engine_dir / f"{name}.onnx")).graph.node]
        assert ops.count("Gelu") == count and "Erf" not in ops, name


def test_in_place_engines_run_each_block_linear_as_one_gemm(onnx_engine_dir, shipped_checkpoint):
    """The in-place engines carry their token stream flat ([B*K, W]), so each linear layer of a block (qkv, proj,
    the two MLP layers) and the head is one Gemm with its bias: no bias Add after a MatMul there (a 3-D MatMul
    exports with a separate Add that ONNX Runtime does not fuse; ~7 % of a one-token step at batch 1)."""
    import onnx

    cfg = shipped_checkpoint.config
    for name, layers in (("target_verify", cfg.target_layers), ("target_jacobi", cfg.target_layers),
                         ("draft_step", cfg.draft_layers)):
        graph = onnx.load(str(onnx_engine_dir / f"{name}.onnx")).graph
        weights = {i.name: len(i.dims) for i in graph.initializer}
        producer = {o: n.op_type for n in graph.node for o in n.output}
        ops = [n.op_type for n in graph.node]
        assert ops.count("Gemm") == 4 * layers + 1, (name, ops.count("Gemm"))
        bias_adds = [n.name for n in graph.node if n.op_type == "Add" and any(producer.get(i) == "MatMul" for i in
                     n.input) and any(weights.get(i) == 1 for i in n.input)]
        assert len(bias_adds) <= 1, (name, bias_adds)        # the token embedding's, before the stream is flat


def test_a_target_jacobi_with_an_older_residual_rule_is_left_unused(onnx_engine_dir, tmp_path, caplog):
    """An export whose target_jacobi predates the reflected residual (no `residual` in its entry) would pair its
    in-graph proposals with the host's reflected continuation: the loader leaves that engine out, says so, and
    Jacobi runs on target_verify and the host rule."""
    old = tmp_path / "old"
    shutil.copytree(onnx_engine_dir, old)
    data = json.loads((old / "manifest.json").read_text())
    del data["engines"]["target_jacobi"]["residual"]
    (old / "manifest.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        engines = load_engines(old, threads=1)
    assert engines.target_jacobi is None and "older rule" in caplog.text and "--force" in caplog.text
    assert load_engines(onnx_engine_dir, threads=1).target_jacobi is not None
    from fastardiff.runtime.speculative import GenerationConfig, generate

    images, stats = generate(engines, np.array([3]), GenerationConfig(draft="jacobi", gamma=4, seed=0))
    assert np.isfinite(images).all() and stats.summary()["tokens_per_target_call"] > 1.0


def test_fuse_gelu_rewrites_exact_gelu_chains_only(tmp_path):
    """x * (0.5 * (1 + erf(x / sqrt 2))) becomes one Gelu with the same values; a chain with another constant (not a
    GELU) is left alone."""
    import onnx
    import onnxruntime as ort

    from fastardiff.exporter.onnx_passes import fuse_gelu
    from fastardiff.exporter.onnx_target import export_onnx_file

    class TwoActivations(torch.nn.Module):
        def forward(self, x):
            not_gelu = x * (0.5 * (1.0 + torch.erf(x / 2.0)))
            return torch.nn.functional.gelu(x * 3.0) + not_gelu

    x = torch.randn(5, 7)
    path = export_onnx_file(TwoActivations(), (x,), tmp_path / "m.onnx", ["x"], ["y"])
    assert fuse_gelu(path) == 1
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Gelu") == 1 and ops.count("Erf") == 1
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, TwoActivations()(x).numpy(), rtol=1e-5, atol=1e-6)
    assert fuse_gelu(path) == 0


def test_second_export_is_cache_hit(onnx_export, export_ckpt_path, caplog):
    out, first, _ = onnx_export
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with caplog.at_level(logging.INFO, logger="fastardiff"):
        manifest, hit = export_engines(export_ckpt_path, out, ExportOptions(target="onnx", gamma=ONNX_GAMMA))
    assert hit and "cache hit" in caplog.text
    assert manifest.to_dict() == first.to_dict()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_force_rebuilds_and_tampering_invalidates_cache(copy_target, export_ckpt_path, tmp_path):
    out = tmp_path / "eng"
    opts = ExportOptions(target="copy")
    assert export_engines(export_ckpt_path, out, opts)[1] is False
    assert export_engines(export_ckpt_path, out, opts)[1] is True
    assert copy_target["builds"] == 1
    assert export_engines(export_ckpt_path, out, ExportOptions(target="copy", force=True))[1] is False
    assert copy_target["builds"] == 2
    with open(out / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    assert export_engines(export_ckpt_path, out, opts)[1] is False  # hash mismatch -> rebuilt, not reused
    assert copy_target["builds"] == 3
    load_engines(out)  # the rebuilt dir verifies
    # a different option is a different cache key
    assert export_engines(export_ckpt_path, out, ExportOptions(target="copy", gamma=3))[1] is False


def test_engine_code_edit_invalidates_cache(copy_target, export_ckpt_path, tmp_path, monkeypatch):
    """The cache key holds a hash of the engine-defining sources: engines built by other engine code (same
    package version) are rebuilt, not reused."""
    from fastardiff.exporter import export

    out, opts = tmp_path / "eng", ExportOptions(target="copy")
    assert export_engines(export_ckpt_path, out, opts)[1] is False
    assert export_engines(export_ckpt_path, out, opts)[1] is True
    assert len(export.engine_code_hash()) == 16
    monkeypatch.setattr(export, "engine_code_hash", lambda: "0" * 16)
    assert export_engines(export_ckpt_path, out, opts)[1] is False and copy_target["builds"] == 2


def test_failed_export_leaves_nothing_and_keeps_old_engines(copy_target, export_ckpt_path, tmp_path):
    out = tmp_path / "eng"
    copy_target["fail"] = True
    with pytest.raises(ParityError):
        export_engines(export_ckpt_path, out, ExportOptions(target="copy"))
    assert list(tmp_path.iterdir()) == []
    copy_target["fail"] = False
    export_engines(export_ckpt_path, out, ExportOptions(target="copy"))
    manifest_before = (out / "manifest.json").read_text()
    copy_target["fail"] = True
    with pytest.raises(ParityError):
        export_engines(export_ckpt_path, out, ExportOptions(target="copy", force=True))
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]
    assert (out / "manifest.json").read_text() == manifest_before
    load_engines(out)


def test_tampered_engine_is_refused_at_load(onnx_engine_dir, tmp_path):
    """Every engine of the export (rollouts included), one flipped byte at a time, is refused by name."""
    from tamper import assert_every_engine_tamper_refused

    assert_every_engine_tamper_refused(onnx_engine_dir, tmp_path, load_engines)


def test_parity_comparator_semantics():
    ref = np.array([1.0, 100.0, 0.0, np.nan], np.float32)
    ok = compare_arrays(ref, np.array([1.00005, 100.05, 5e-5, np.nan], np.float32), atol=1e-4, rtol=1e-3)
    assert ok["mismatches"] == 0 and abs(ok["max_abs"] - 0.05) < 1e-3  # 100.05: abs fails, rel passes
    bad = compare_arrays(ref, np.array([1.01, 100.0, 0.0, 0.0], np.float32), atol=1e-4, rtol=1e-3)
    assert bad["mismatches"] == 2  # 1.01 fails both tolerances; nan vs 0 is a mismatch
    with pytest.raises(ParityError, match="shape"):
        compare_arrays(ref, ref[:2], 1e-4, 1e-3)


def _reference_outputs(ckpt, name, inputs):
    modules = make_engine_modules(ckpt.target, ckpt.draft, ckpt.decoder)
    with torch.no_grad():
        out = modules[name](*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def test_onnxruntime_backend_matches_torch_on_ragged_inputs(onnx_engine_dir, export_ckpt_path, shipped_checkpoint):
    tiny_config = shipped_checkpoint.config
    from fastardiff.recipes.checkpoint import load_checkpoint
    from fastardiff.runtime.backend_onnxruntime import OnnxRuntimeEngines

    ckpt = load_checkpoint(export_ckpt_path)
    engines = load_engines(onnx_engine_dir)
    assert isinstance(engines, OnnxRuntimeEngines) and "CPUExecutionProvider" in engines.providers
    assert engines.capabilities.needs_cache_room       # the default onnx export: in place (host-write engines: below)
    cap = tiny_config.seq_len
    for name, layers, (b, k, s) in [("draft_step", tiny_config.draft_layers, (5, 1, 37)),
                                    ("target_verify", tiny_config.target_layers, (7, 5, 50)),
                                    ("target_verify", tiny_config.target_layers, (3, 2, 0))]:
        tokens, lengths, kc, vc, cond = (x.numpy() for x in example_inputs(tiny_config, name, layers, b, k, s, seed=7))
        lengths[1:] = np.arange(1, b) * 3 % (min(s, cap - k) + 1)  # ragged lengths, including 0
        # the runtime passes its full-capacity cache buffers (garbage past each row's length is masked)
        full_k, full_v = (np.random.default_rng(1).standard_normal(kc.shape[:3] + (cap, kc.shape[4]), np.float32)
                          for _ in range(2))
        full_k[:, :, :, :s], full_v[:, :, :, :s] = kc, vc
        got = getattr(engines, name)(tokens, lengths, full_k, full_v, cond)
        want = _reference_outputs(ckpt, name, (tokens, lengths, kc, vc, cond))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-3)
    tokens, entropy, cond = (x.numpy() for x in example_inputs(tiny_config, "decoder", 0, 3, 64, 0, seed=3))
    image = engines.decoder(tokens, entropy, cond)
    assert image.shape == (3, 1, 32, 32)
    np.testing.assert_allclose(image, _reference_outputs(ckpt, "decoder", (tokens, entropy, cond))[0],
                               atol=1e-4, rtol=1e-3)


def test_onnx_engines_run_without_torch(onnx_engine_dir):
    """Loading ONNX engines and decoding with them must not import torch (checked in a fresh interpreter)."""
    code = (
        "import sys, numpy as np\n"
        "from fastardiff.runtime.engine import load_engines\n"
        f"e = load_engines({str(onnx_engine_dir)!r})\n"
        "img = e.decoder(np.zeros((2, 64, 16), np.float32), np.zeros((2, 64), np.float32), np.array([1, 2]))\n"
        "assert img.shape == (2, 1, 32, 32), img.shape\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad[:5]\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("flush", [True, False])
def test_onnx_calls_flush_denormals_and_leave_the_thread_as_it_was(onnx_engine_dir, flush):
    """Every ONNX Runtime call runs with denormals flushed (a masked softmax row's underflow: ~5x slower arithmetic
    on x86) by default, and only then, and the calling thread's floating-point state is the same after it (no
    process state left behind: ONNX Runtime's own switch would leave it). Checked in a fresh interpreter: the
    sessions' run functions record whether a denormal product reads 0 while they run (the plain path: decoder; the
    bound in-place path: target_verify), and numpy's own arithmetic is checked after the calls."""
    code = (
        "import numpy as np\n"
        "from fastardiff.runtime.engine import load_engines\n"
        "from fastardiff.runtime.speculative import GenerationConfig, generate\n"
        "tiny = lambda: float((np.array([1e-38], np.float32) * np.float32(0.01))[0]) == 0.0\n"
        "seen = []\n"
        "class Spy:\n"
        "    def __init__(self, inner): self.inner = inner\n"
        "    def __getattr__(self, name):\n"
        "        fn = getattr(self.inner, name)\n"
        "        def wrapped(*a, **k):\n"
        "            seen.append(tiny())\n"
        "            return fn(*a, **k)\n"
        "        return wrapped\n"
        f"e = load_engines({str(onnx_engine_dir)!r}, flush_denormals={flush})\n"
        "for name in ('decoder', 'target_verify'):\n"
        "    e.sessions[name]._sess = Spy(e.sessions[name]._sess)\n"
        "before = tiny()\n"
        "generate(e, np.array([1]), GenerationConfig(mode='target', seed=0))\n"
        "print(e.flush_denormals, sorted(set(seen)), len(seen) > 60, before, tiny())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(flush), f"[{flush}]", "True", "False", "False"], proc.stdout


def test_fastardiff_run_on_onnx_engines_does_not_import_torch(onnx_engine_dir, tmp_path):
    """`fastardiff-run --engine DIR` end to end in a fresh interpreter: PNG + stats written, torch never imported."""
    png, stats = tmp_path / "grid.png", tmp_path / "stats.json"
    args = ["--engine", str(onnx_engine_dir), "--prompt", "3,7", "--gamma", "4", "--seed", "1", "--out", str(png),
            "--stats-json", str(stats)]
    code = (
        "import sys\n"
        "from fastardiff.cli import run_main\n"
        f"run_main({args!r})\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad[:5]\n"
        "print('no torch')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("no torch"), proc.stderr[-2000:]
    assert png.stat().st_size > 0 and json.loads(stats.read_text())["images"] == 2


def test_speculative_run_on_onnx_matches_torch_backend(onnx_engine_dir, export_ckpt_path):
    """Same seed, same prompts: the ONNX engines give the torch backend's images (within float tolerance) and
    exactly the same decoding statistics (acceptances, early stops, calls)."""
    from fastardiff.exporter.torch_backend import load_torch_engines
    from fastardiff.runtime.speculative import GenerationConfig

    classes = np.array([0, 1, 2, 3, 4, 5, 7, 9])
    gen = GenerationConfig(mode="speculative", gamma=ONNX_GAMMA, early_stop="context", seed=5)
    onnx_run, torch_run = generate_on_both(load_engines(onnx_engine_dir), load_torch_engines(export_ckpt_path),
                                           classes, gen)
    (img_onnx, st_onnx) = onnx_run
    assert img_onnx.shape == (8, 1, 32, 32)
    assert_same_run(onnx_run, torch_run)
    assert st_onnx.drafts_accepted > 0 and st_onnx.residual_samples > 0 and st_onnx.bonus_tokens > 0


def test_guided_speculative_run_on_onnx_matches_torch_backend(onnx_engine_dir, export_ckpt_path):
    """Classifier-free guidance (engine batch = [cond; null] rows) through both backends."""
    from fastardiff.exporter.torch_backend import load_torch_engines
    from fastardiff.runtime.speculative import GenerationConfig

    gen = GenerationConfig(mode="speculative", gamma=ONNX_GAMMA, early_stop="static", cfg_scale=2.0, seed=9)
    assert_same_run(*generate_on_both(load_engines(onnx_engine_dir), load_torch_engines(export_ckpt_path),
                                      np.array([2, 6, 8]), gen))


@pytest.mark.parametrize("coupling,cfg_scale", [(True, 1.0), (False, 2.0)])
def test_jacobi_round_engine_on_onnx_matches_torch_backend(onnx_engine_dir, export_ckpt_path, coupling, cfg_scale):
    """--draft jacobi through the exported target_jacobi engine (sampling, acceptance and coupling in-graph) gives
    the torch reference module's run for the same seed, ragged rows and guidance included; and it is that
    engine that ran (every round with guesses: the first one too when the manifest has the prior proposal, else
    that round is a plain target step; a last token alone is one)."""
    from fastardiff.exporter.torch_backend import load_torch_engines
    from fastardiff.runtime.speculative import GenerationConfig

    engines = load_engines(onnx_engine_dir)
    assert "target_jacobi" in engines.manifest.engines and engines.target_jacobi is not None
    calls = []
    inner = engines._run
    engines._run = lambda name, arrays: calls.append(name) or inner(name, arrays)
    gen = GenerationConfig(mode="speculative", draft="jacobi", gamma=4, coupling=coupling, cfg_scale=cfg_scale,
                           seed=4)
    run = generate_on_both(engines, load_torch_engines(export_ckpt_path), np.array([1, 7, 0]), gen)
    assert_same_run(*run)
    stats = run[0][1]
    assert calls.count("target_verify") + calls.count("target_jacobi") == stats.target_calls
    assert calls.count("target_jacobi") >= 0.8 * stats.target_calls
    assert calls[0] == ("target_jacobi" if engines.manifest.jacobi_prior is not None else "target_verify")


def test_bench_pipeline_rows_and_table(onnx_engine_dir):
    from fastardiff.exporter.bench_cli import format_table, pipeline_rows

    rows = pipeline_rows({"onnxruntime": load_engines(onnx_engine_dir)}, batch=2, repeats=1, gammas=[1, 2],
                         early_stop="static", seed=0, jacobi_windows=[4])
    assert [(r["backend"], r["mode"], r["gamma"]) for r in rows] == [
        ("onnxruntime", "target", "-"), ("onnxruntime", "speculative", 1), ("onnxruntime", "speculative", 2),
        ("onnxruntime", "jacobi", 4), ("onnxruntime", "jacobi-independent", 4)]
    for r in rows:
        shares = r["draft %"] + r["verify %"] + r["decode %"] + r["outside engines %"]
        assert abs(shares - 100) < 1e-6 and r["images"] == 2 and r["ms/image"] > 0
        assert r["per call ms"]["target step"] > 0
    assert rows[0]["speedup"] == 1.0 and rows[0]["draft %"] == 0.0 and rows[0]["tok/target call"] == 1.0
    for r in rows[1:3]:  # one rollout call per round: draft calls == rounds
        assert r["summary"]["target_calls"] == r["summary"]["draft_calls"]  # no eta prefill by default
        assert r["model speedup"] > 0
    for r in rows[3:]:   # Jacobi: no draft call, every target call a round, more than one token per call
        assert r["summary"]["draft_calls"] == 0 and r["summary"]["draft"] == "jacobi"
        assert r["tok/target call"] > 1.2 and r["per call ms"]["rollout"] == 0.0
    table = format_table(rows).splitlines()
    assert len(table) == 7 and "outside engines %" in table[0]
    assert table[4].split()[:4] == ["onnxruntime", "2", "speculative", "2"]
    assert table[5].split()[:4] == ["onnxruntime", "2", "jacobi", "4"]


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("mode", ["off", "static", "context"])
def test_onnx_rollout_equals_gamma_step_calls(onnx_engine_dir, guided, mode):
    """The exported draft_rollout_3 against three exported draft_step calls, same noise, ragged rows."""
    from rollout_check import check_rollout_matches_steps

    stopped = check_rollout_matches_steps(load_engines(onnx_engine_dir), ONNX_GAMMA, guided, mode)
    assert (stopped == 0) if mode == "off" else (stopped > 0)


def test_gamma_auto_on_the_shipped_model_is_never_slower(onnx_engine_dir):
    """The shipped model's calibrated acceptance (model draft and Jacobi) and its engines' measured costs rank the
    candidates; whole-image runs against target-only decide: at either batch a mode runs only where it measured at
    least the margin faster, and then it is the fastest measured finalist. (Which mode wins is a measured figure,
    timed here on a possibly busy machine: `fastardiff bench pipeline` reports it; this test checks the decision.)"""
    from fastardiff.runtime.gamma_auto import FINALIST_FLOOR, choose_gamma

    engines = load_engines(onnx_engine_dir, threads=1)
    wide = choose_gamma(engines, batch=8, cfg_scale=1.0)
    for choice in (wide, choose_gamma(engines, batch=1, cfg_scale=1.0)):
        drafts = [c["draft"] for c in choice.candidates]
        assert drafts.count("model") == ONNX_GAMMA and drafts.count("jacobi") >= 3, choice.table()
        finalists = [c for c in choice.candidates if "measured_speedup" in c]
        # one finalist per proposal kind: its best predicted candidate, unless even that prediction is hopeless
        for draft in ("model", "jacobi"):
            mine = [c for c in choice.candidates if c["draft"] == draft]
            best = max(mine, key=lambda c: c["speedup"])
            hopeless = best["speedup"] < FINALIST_FLOOR
            assert [c for c in finalists if c["draft"] == draft] == ([] if hopeless else [best])
        # a finalist runs only where the paired runs separated it ("faster": >= the margin, confidently not slower)
        verdicts = choice.confidence.get("finalists", {})
        faster = [c for c in finalists if verdicts[f"{c['draft']}:{c['gamma']}"]["verdict"] == "faster"]
        if choice.gamma is None:
            assert not faster, choice.table()
        else:
            chosen = max(faster, key=lambda c: c["measured_speedup"])
            assert (choice.draft, choice.gamma) == (chosen["draft"], chosen["gamma"]), choice.table()
            assert chosen["measured_speedup"] >= 1.10, choice.table()
            assert verdicts[f"{chosen['draft']}:{chosen['gamma']}"]["low"] > 1.0, choice.table()


def test_execution_provider_choice(onnx_engine_dir):
    """GPU providers come first when onnxruntime offers them; TensorRT gets the manifest's shape profiles."""
    from types import SimpleNamespace

    from fastardiff.runtime.backend_onnxruntime import choose_providers

    manifest = load_manifest(onnx_engine_dir)
    gpu_ort = SimpleNamespace(get_available_providers=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                                 "CPUExecutionProvider"])
    chosen = choose_providers(gpu_ort, manifest, "target_verify")
    assert [c[0] if isinstance(c, tuple) else c for c in chosen] == ["TensorrtExecutionProvider",
                                                                     "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = chosen[0][1]
    c = manifest.config
    d, layers, heads, head_dim = c["token_dim"], c["target_layers"], c["heads"], c["width"] // c["heads"]
    assert manifest.engines["target_verify"].cache_layers == layers      # per-layer cache inputs (in place)
    caches = ",".join(f"{n}:1x{heads}x0x{head_dim}" for n in per_layer_io(["k_cache", "v_cache"], [], layers)[0])
    assert trt["trt_profile_min_shapes"] == f"tokens:1x1x{d},lengths:1,{caches},cond:1"
    cap = c["n_cond"] + (c["image_size"] // c["patch"]) ** 2 - 1
    assert trt["trt_profile_max_shapes"].startswith(f"tokens:8x{cap}x{d},lengths:8,k_cache_0:8x{heads}x{cap}x")
    jacobi = choose_providers(gpu_ort, manifest, "target_jacobi")[0][1]
    for corner in ("min", "opt", "max"):   # every input of the engine has a shape at every corner
        names = [part.split(":")[0] for part in jacobi[f"trt_profile_{corner}_shapes"].split(",")]
        assert names == manifest.engines["target_jacobi"].inputs
    assert choose_providers(gpu_ort, manifest, "decoder", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    cpu_ort = SimpleNamespace(get_available_providers=lambda: ["CPUExecutionProvider"])
    assert choose_providers(cpu_ort, manifest, "draft_step") == ["CPUExecutionProvider"]
    with pytest.raises(EngineError, match="not available"):
        choose_providers(cpu_ort, manifest, "draft_step", ["CUDAExecutionProvider"])


def test_no_draft_engine_dir_runs_jacobi_only(onnx_engine_dir, tmp_path, capsys):
    """An engine dir with only target_verify and the decoder (what `fastardiff-export --no-draft` writes) loads,
    runs `--draft jacobi` (also chosen by --draft auto), refuses the model draft with one clear line, and its
    manifest still refuses a missing target."""
    import json
    import shutil

    from cli_runner import run_cli

    out = tmp_path / "no-draft"
    out.mkdir()
    manifest = json.loads((onnx_engine_dir / "manifest.json").read_text())
    manifest["engines"] = {k: v for k, v in manifest["engines"].items() if k in ("target_verify", "decoder")}
    for entry in manifest["engines"].values():
        shutil.copy(onnx_engine_dir / entry["file"], out / entry["file"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    stats = tmp_path / "s.json"
    code, _, err = run_cli(["run", "--engine", str(out), "--prompt", "1,2", "--gamma", "3", "--num-images", "2",
                            "--out", str(tmp_path / "a.png"), "--stats-json", str(stats)], capsys)
    assert code == 0, err
    summary = json.loads(stats.read_text())
    assert summary["draft"] == "jacobi" and summary["draft_calls"] == 0 and summary["tokens"] == 2 * 64
    code, _, err = run_cli(["run", "--engine", str(out), "--prompt", "1", "--draft", "model", "--gamma", "2",
                            "--out", str(tmp_path / "b.png")], capsys)
    assert code == 2 and "no draft model" in err and "--draft jacobi" in err
    assert not (tmp_path / "b.png").exists()
    del manifest["engines"]["target_verify"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(["run", "--engine", str(out), "--prompt", "1", "--draft", "jacobi", "--gamma", "2",
                            "--out", str(tmp_path / "c.png")], capsys)
    assert code == 2 and "target_verify" in err


def test_a_real_parity_failure_fails_the_export_and_leaves_nothing(random_checkpoint_path, tmp_path, monkeypatch):
    """Driven through the real comparison: the exported draft_step has its first attention weights nudged
    (noise of scale 1e-2) while its reference does not; ONNX Runtime's outputs then differ beyond --atol/--rtol, the export fails naming the
    engine, and neither the engine dir nor any staging dir is left behind."""
    import torch

    from fastardiff.exporter import targets

    real = targets.engine_modules

    def nudged(ckpt, opts):
        modules, references = real(ckpt, opts)
        with torch.no_grad():
            weight = next(p for n, p in modules["draft_step"].named_parameters() if n.endswith("qkv.weight"))
            weight += 1e-2 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
        return {"draft_step": modules["draft_step"]}, {"draft_step": references["draft_step"]}

    monkeypatch.setattr(targets, "engine_modules", nudged)
    out = tmp_path / "engines"
    with pytest.raises(ParityError, match="draft_step.*differs from the PyTorch reference"):
        export_engines(random_checkpoint_path, out, ExportOptions(target="onnx", gamma=1, max_batch=2))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture(scope="session")
def in_place_engine_dir(onnx_engine_dir):
    """The default onnx export of the shipped model: `--kv-update auto` makes its AR engines in place
    (exporter/onnx_passes.py)."""
    assert load_manifest(onnx_engine_dir).export["kv_update"].startswith("in place")
    return onnx_engine_dir


def test_ar_engines_update_the_cache_in_place(in_place_engine_dir, shipped_checkpoint):
    """draft_step / target_verify / target_jacobi write their new keys/values into the cache buffer they are given
    (IOBinding onto the caller's memory), each row at its own length, nothing else touched; their contract outputs
    still equal the PyTorch reference. The rest of the engines are as `--kv-update host` exports them."""
    from fastardiff.exporter.engine_modules import jacobi_example_inputs
    from fastardiff.runtime.distribution import SigmaParams

    engines = load_engines(in_place_engine_dir)
    manifest = engines.manifest
    caps = engines.capabilities
    assert caps.kv_in_place == {"draft_step", "target_verify", "target_jacobi"} and caps.needs_cache_room
    assert all(manifest.engines[n].outputs == ENGINE_IO[n][1] for n in manifest.engines if n not in caps.kv_in_place)
    ckpt = shipped_checkpoint
    modules = make_engine_modules(ckpt.target, ckpt.draft, ckpt.decoder,
                                  SigmaParams.from_config(manifest.config, manifest.calibration))
    cfg = ckpt.config
    for name in sorted(engines.capabilities.kv_in_place):
        layers = cfg.draft_layers if name == "draft_step" else cfg.target_layers
        entry = manifest.engines[name]
        assert (entry.inputs, entry.outputs) == per_layer_io(*ENGINE_IO[name], layers) and entry.cache_layers == layers
        if name == "target_jacobi":
            inputs = [x.numpy() for x in jacobi_example_inputs(cfg, layers, 4, 4, 30, torch.Generator().manual_seed(5))]
        else:
            inputs = [x.numpy() for x in example_inputs(cfg, name, layers, 4, 3, 30, seed=5)]
        inputs[1][:] = [7, 0, 19, 7]                                      # ragged, one row at 0
        k, v = (np.ascontiguousarray(a) for a in inputs[2:4])
        k_before, v_before = k.copy(), v.copy()
        with torch.no_grad():
            want = modules[name](*[torch.from_numpy(np.array(x)) for x in (inputs[0], inputs[1], k, v, *inputs[4:])])
        got = engines._run(name, (inputs[0], inputs[1], k, v, *inputs[4:]))
        assert len(got) == len(ENGINE_IO[name][1])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-3)
        new_k, new_v = got[-2:]
        width = new_k.shape[3]
        for before, after, new in ((k_before, k, new_k), (v_before, v, new_v)):
            expected = before.copy()
            for r, start in enumerate(inputs[1]):
                expected[:, r, :, start:start + width] = new[:, r]
            np.testing.assert_array_equal(after, expected)
            assert not np.array_equal(after, before)
    short = np.zeros(k.shape[:3] + (8, k.shape[4]), np.float32)   # no room for 4 tokens at length 7
    with pytest.raises(EngineError, match="no room"):
        engines.target_verify(np.zeros((4, 4, cfg.token_dim), np.float32), np.array([7, 0, 1, 2]), short, short,
                              np.arange(4))


@pytest.fixture(scope="session")
def host_engine_dir(export_ckpt_path, tmp_path_factory):
    """`--kv-update host` engines of the same (shipped) model: the runtime writes the cache."""
    out = tmp_path_factory.mktemp("host") / "engines"
    export_engines(export_ckpt_path, out, ExportOptions(target="onnx", gamma=1, max_batch=8, kv_update="host"))
    return out


def test_host_write_engines_take_prefix_views_and_equal_in_place_engines(host_engine_dir, in_place_engine_dir,
                                                                          shipped_checkpoint):
    """`--kv-update host` ONNX engines take the contract's stacked caches, also as the non-contiguous prefix views
    the runtime passes them (no room needed), and match the PyTorch reference; target-only tokens equal the
    in-place engines' (same network, keys attended in another order: float-close)."""
    from fastardiff.runtime.speculative import GenerationConfig, generate

    host = load_engines(host_engine_dir)
    assert host.capabilities.kv_in_place == frozenset() and not host.capabilities.needs_cache_room
    assert all(e.cache_layers == 0 and (e.inputs, e.outputs) == tuple(map(list, ENGINE_IO[n]))
               for n, e in host.manifest.engines.items())
    cfg = shipped_checkpoint.config
    cap = cfg.seq_len
    for name, layers, (b, k, s) in [("draft_step", cfg.draft_layers, (5, 1, 37)),
                                    ("target_verify", cfg.target_layers, (4, 5, 50)),
                                    ("target_verify", cfg.target_layers, (3, 2, 0))]:
        tokens, lengths, kc, vc, cond = (x.numpy() for x in example_inputs(cfg, name, layers, b, k, s, seed=7))
        lengths[1:] = np.arange(1, b) * 3 % (min(s, cap - k) + 1)  # ragged lengths, including 0
        full = np.zeros(kc.shape[:3] + (cap, kc.shape[4]), np.float32)
        full[:, :, :, :s] = kc
        got = getattr(host, name)(tokens, lengths, full[:, :, :, :s], vc, cond)     # a prefix view, no room
        for g, w in zip(got, _reference_outputs(shipped_checkpoint, name, (tokens, lengths, kc, vc, cond))):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-3)
    # the first tokens of a guided target-only run (float differences of the two key orders compound over a
    # whole image of the trained model, so the comparison stops early)
    gen = GenerationConfig(mode="target", seed=4, cfg_scale=2.0, num_tokens=6)
    tokens = [generate(e, np.array([1, 6, 8]), gen)[0] for e in (host, load_engines(in_place_engine_dir))]
    np.testing.assert_allclose(tokens[0], tokens[1], atol=1e-3)


def test_in_place_bindings_follow_the_buffers_passed(in_place_engine_dir):
    """The per-layer cache bindings are kept between calls that pass the same buffer (same address and shape) and
    redone for another one: a second buffer gets the write and the first is left alone; a call's outputs are its
    own (an earlier call's arrays are not overwritten by the next call)."""
    engines = load_engines(in_place_engine_dir)
    cfg = engines.manifest.config
    shape = (cfg["target_layers"], 2, cfg["heads"], 20, cfg["width"] // cfg["heads"])
    first, second = (np.zeros(shape, np.float32) for _ in range(2))
    rng = np.random.default_rng(0)
    tokens = lambda: rng.standard_normal((2, 3, cfg["token_dim"]), dtype=np.float32)  # noqa: E731
    out_a = engines.target_verify(tokens(), np.array([0, 4]), first, first.copy(), np.array([1, 2]))
    kept = [a.copy() for a in out_a]
    out_b = engines.target_verify(tokens(), np.array([3, 0]), first, first.copy(), np.array([1, 2]))
    assert all(np.array_equal(a, b) for a, b in zip(out_a, kept)) and not np.array_equal(out_a[0], out_b[0])
    np.testing.assert_array_equal(first[:, 0, :, 3:6], out_b[2][:, 0])         # the second call's write, row 0
    before = first.copy()
    out_c = engines.target_verify(tokens(), np.array([1, 1]), second, second.copy(), np.array([3, 4]))
    np.testing.assert_array_equal(first, before)
    np.testing.assert_array_equal(second[:, :, :, 1:4], out_c[2])
    assert not second[:, :, :, 4:].any() and not second[:, :, :, :1].any()


def test_in_place_input_bindings_read_the_arrays_of_each_call(in_place_engine_dir):
    """An input binding is skipped when the array has the address and shape already bound: a buffer rewritten in
    place between calls is read anew, a new array at another address is bound, and each call equals the plain
    (unbound) call on the same inputs."""
    engines = load_engines(in_place_engine_dir)
    plain = load_engines(in_place_engine_dir, in_place=False)
    cfg = engines.manifest.config
    shape = (cfg["target_layers"], 2, cfg["heads"], 20, cfg["width"] // cfg["heads"])
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((2, 3, cfg["token_dim"]), dtype=np.float32)
    lengths, cond = np.array([2, 5]), np.array([3, 7])
    results = []
    for step in range(3):
        if step == 1:
            tokens[:] = rng.standard_normal(tokens.shape, dtype=np.float32)     # same address, new contents
        if step == 2:
            tokens = rng.standard_normal(tokens.shape, dtype=np.float32)        # a new array
        cache = np.zeros(shape, np.float32)
        got = engines.target_verify(tokens, lengths, cache, cache.copy(), cond)
        want = plain.target_verify(tokens, lengths, np.zeros(shape, np.float32), np.zeros(shape, np.float32), cond)
        np.testing.assert_allclose(got.mean, want.mean, atol=1e-5)
        results.append(got.mean.copy())
    assert not np.allclose(results[0], results[1]) and not np.allclose(results[1], results[2])


def test_runs_reuse_pooled_cache_buffers_and_equal_unpooled_runs(in_place_engine_dir):
    """Host KV buffers go back to the engines' pool after a run and the next run of that shape takes them (zeroed:
    the same tokens as a run with fresh buffers, for target-only, Jacobi and the model draft)."""
    from fastardiff.runtime.kv_cache import HostBufferPool
    from fastardiff.runtime.speculative import GenerationConfig, generate

    engines = load_engines(in_place_engine_dir)
    assert isinstance(engines.capabilities.cache_pool, HostBufferPool)
    for settings in ({"mode": "target"}, {"mode": "speculative", "draft": "jacobi", "gamma": 3},
                     {"mode": "speculative", "draft": "model", "gamma": 2, "cfg_scale": 2.0}):
        gen = GenerationConfig(seed=5, **settings)
        pooled = [generate(engines, np.array([2, 7]), gen)[0] for _ in range(2)]
        free = {key: [k.ctypes.data for k, _ in pairs] for key, pairs in engines.capabilities.cache_pool._free.items()}
        again = generate(engines, np.array([2, 7]), gen)[0]
        assert free == {key: [k.ctypes.data for k, _ in pairs]
                        for key, pairs in engines.capabilities.cache_pool._free.items()}
        pooled_caps = engines.capabilities
        engines.capabilities = dataclasses.replace(pooled_caps, cache_pool=None)
        fresh = generate(engines, np.array([2, 7]), gen)[0]
        engines.capabilities = pooled_caps
        for tokens in (*pooled, again):
            np.testing.assert_array_equal(tokens, fresh)
        assert free and all(free.values()), settings     # a pair given back and kept (not just a key made)


def test_host_buffer_pool_never_hands_out_a_pair_twice():
    from fastardiff.runtime.kv_cache import HostBufferPool

    pool = HostBufferPool(keep=1)
    a = pool.take((2, 3), np.float32)
    b = pool.take((2, 3), np.float32)
    assert a[0] is not b[0]
    a[0][:] = 1.0
    pool.give(*a)
    pool.give(*b)                        # over `keep`: dropped
    c = pool.take((2, 3), np.float32)
    assert c[0] is a[0] and not c[0].any()
    assert pool.take((2, 3), np.float32)[0] is not a[0]


def test_in_place_runs_leave_out_the_host_write_and_equal_host_written_runs(in_place_engine_dir, monkeypatch):
    """With in-place engines a whole-buffer call needs no host write: target-only and Jacobi runs make none (batch
    1: every call passes the whole buffer), model-draft runs only the draft_rollout's (not in place), and the tokens
    equal the same engines with the host writing every call (if an engine's write were lost, its cache would stay
    empty and the tokens differ). At batch 3 rows finish apart: those calls pass rows and the host writes them."""
    from fastardiff.runtime import kv_cache
    from fastardiff.runtime.speculative import GenerationConfig, generate

    engines = load_engines(in_place_engine_dir)
    plain = load_engines(in_place_engine_dir, in_place=False)
    assert plain.capabilities.kv_in_place == frozenset() and plain.capabilities.needs_cache_room
    writes = []
    real_write = kv_cache.KVCache.write
    monkeypatch.setattr(kv_cache.KVCache, "write", lambda self, *a: (writes.append(1), real_write(self, *a)))
    for classes, settings in ((np.array([4]), {"mode": "target"}),
                              (np.array([4]), {"mode": "speculative", "draft": "jacobi", "gamma": 2}),
                              (np.array([4]), {"mode": "speculative", "draft": "model", "gamma": 2, "cfg_scale": 2.0}),
                              (np.array([1, 5, 9]), {"mode": "speculative", "draft": "model", "gamma": 2})):
        gen = GenerationConfig(seed=3, **settings)
        writes.clear()
        in_place, stats = generate(engines, classes, gen)
        host_writes = len(writes)
        writes.clear()
        host, _ = generate(plain, classes, gen)
        assert len(writes) >= stats.target_calls
        np.testing.assert_array_equal(in_place, host)
        if len(classes) == 1:   # the draft_rollout engines (static cache, not in place) still write: one per round
            assert host_writes == (stats.draft_calls if settings.get("draft") == "model" else 0), settings
        else:
            assert host_writes < len(writes)


def test_kv_update_in_place_on_trt_follows_the_tensorrt_version(tiny_config, monkeypatch):
    """trt: in place by default where TensorRT's parser takes TensorScatter (10.15+) or for --onnx-only graphs;
    host below 10.15, where an explicit --kv-update in-place is a clear error naming the fix."""
    from fastardiff.errors import FastardiffError
    from fastardiff.exporter import targets
    from fastardiff.exporter.targets import ExportOptions

    monkeypatch.setattr(targets, "installed_trt_version", lambda: "10.14.1")
    assert targets.resolve_options(ExportOptions(target="trt", trt_library="tensorrt")).kv_update == "host"
    assert targets.resolve_options(ExportOptions(target="trt", trt_library="tensorrt", onnx_only=True)).kv_update == "in-place"
    with pytest.raises(FastardiffError, match=r"needs TensorRT 10\.15 or later.*TensorRT 10\.14\.1.*--kv-update host"):
        targets.check_options(tiny_config, ExportOptions(target="trt", trt_library="tensorrt", kv_update="in-place"))
    targets.check_options(tiny_config, ExportOptions(target="trt", trt_library="tensorrt", kv_update="in-place", onnx_only=True))
    for version in ("10.15.0", "11.1.0"):
        monkeypatch.setattr(targets, "installed_trt_version", lambda: version)
        assert targets.resolve_options(ExportOptions(target="trt", trt_library="tensorrt")).kv_update == "in-place"
        targets.check_options(tiny_config, ExportOptions(target="trt", trt_library="tensorrt", kv_update="in-place"))