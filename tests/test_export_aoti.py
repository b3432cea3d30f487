"""AOTInductor export of the engines (the suite's only AOTI compile: ~20-40 s per engine on 2 cores),
parity recorded in the manifest, and the aoti backend against the PyTorch reference on ragged inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastardiff.exporter.engine_modules import ENGINE_IO, example_inputs, make_engine_modules
from fastardiff.exporter.export import export_engines
from fastardiff.exporter.targets import ExportOptions, library_versions
from fastardiff.runtime.engine import load_engines
from fastardiff.runtime.manifest import ENGINE_NAMES, sha256_file
from same_run import assert_same_run, generate_on_both

pytestmark = pytest.mark.slow
AOTI_GAMMA = 1   # rollout 1 only: each is one more AOTInductor compile on the 2-core CI machine


@pytest.fixture(scope="module")
def aoti_export(random_checkpoint_path, tmp_path_factory):
    """The small random-weight model (4-layer target, 2-layer draft): AOTInductor's compile time grows with the
    graph, and every check here compares the packages with the torch reference of the same weights."""
    ckpt_path = random_checkpoint_path
    out = tmp_path_factory.mktemp("engines") / "aoti"
    manifest, hit = export_engines(ckpt_path, out, ExportOptions(target="aoti", gamma=AOTI_GAMMA))
    return ckpt_path, out, manifest, hit


def test_aoti_export_manifest_and_parity(aoti_export):
    _, out, manifest, hit = aoti_export
    assert not hit and manifest.backend == "aoti" and manifest.device == "cpu"
    assert manifest.library_versions["torch"] == library_versions(["torch"])["torch"] is not None
    assert manifest.rollout_engines() == {g: f"draft_rollout_{g}" for g in range(1, AOTI_GAMMA + 1)}
    for name in list(ENGINE_NAMES) + ["target_jacobi"] + list(manifest.rollout_engines().values()):
        entry = manifest.engines[name]
        assert entry.file == f"{name}.pt2" and entry.sha256 == sha256_file(out / entry.file)
        assert set(entry.parity["outputs"]) == set(ENGINE_IO[name][1])
        for stats in entry.parity["outputs"].values():
            assert stats["mismatches"] == 0 and stats["max_abs"] <= 1e-4, (name, stats)


def test_aoti_backend_matches_torch_and_is_cached(aoti_export):
    from fastardiff.recipes.checkpoint import load_checkpoint
    from fastardiff.runtime.backend_aoti import AotiEngines

    ckpt_path, out, _, _ = aoti_export
    ckpt = load_checkpoint(ckpt_path)
    tiny_config = ckpt.config
    modules = make_engine_modules(ckpt.target, ckpt.draft, ckpt.decoder)
    engines = load_engines(out)
    assert isinstance(engines, AotiEngines)
    cases = [("draft_step", tiny_config.draft_layers, (6, 1, 41)),
             ("target_verify", tiny_config.target_layers, (8, 5, 30)),
             ("target_verify", tiny_config.target_layers, (1, 63, 0)), ("decoder", 0, (5, 64, 0))]
    for name, layers, (b, k, s) in cases:
        inputs = example_inputs(tiny_config, name, layers, b, k, s, seed=11)
        if name != "decoder":
            inputs[1][1:] = torch.arange(1, b) * 7 % (min(s, tiny_config.seq_len - k) + 1)  # ragged
        with torch.no_grad():
            want = modules[name](*inputs)
        want = want if isinstance(want, tuple) else (want,)
        got = getattr(engines, name)(*(x.numpy() for x in inputs))
        got = got if isinstance(got, tuple) else (got,)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-3)
    assert export_engines(ckpt_path, out, ExportOptions(target="aoti", gamma=AOTI_GAMMA))[1] is True  # cache hit


def test_speculative_run_on_aoti_matches_torch_backend(aoti_export):
    from fastardiff.exporter.torch_backend import load_torch_engines
    from fastardiff.runtime.speculative import GenerationConfig

    ckpt_path, out, _, _ = aoti_export
    gen = GenerationConfig(mode="speculative", gamma=AOTI_GAMMA, early_stop="static", seed=3)
    assert_same_run(*generate_on_both(load_engines(out), load_torch_engines(ckpt_path), np.array([1, 4, 7]), gen))


def test_jacobi_run_on_aoti_matches_torch_backend(aoti_export):
    """--draft jacobi through the AOTInductor target_jacobi package (sampling in-graph) equals the torch
    reference module's run for the same seed, with guidance (ragged rows)."""
    from fastardiff.exporter.torch_backend import load_torch_engines
    from fastardiff.runtime.speculative import GenerationConfig

    ckpt_path, out, _, _ = aoti_export
    engines = load_engines(out)
    assert engines.target_jacobi is not None
    gen = GenerationConfig(mode="speculative", draft="jacobi", gamma=3, cfg_scale=1.5, seed=5)
    assert_same_run(*generate_on_both(engines, load_torch_engines(ckpt_path), np.array([2, 9]), gen))


@pytest.mark.parametrize("guided", [False, True])
def test_aoti_rollout_equals_gamma_step_calls(aoti_export, guided):
    from rollout_check import check_rollout_matches_steps

    _, out, _, _ = aoti_export
    assert check_rollout_matches_steps(load_engines(out), AOTI_GAMMA, guided, "context") > 0


def test_aoti_tampered_engine_is_refused_at_load(aoti_export, tmp_path):
    """Every AOTI package of the export, one flipped byte at a time, is refused by name before it is loaded."""
    from tamper import assert_every_engine_tamper_refused

    assert_every_engine_tamper_refused(aoti_export[1], tmp_path, load_engines)
