"""AOTInductor export of the engines (the suite's only AOTI compile: ~20-40 s per engine on 2 cores),
parity recorded in the manifest, and the aoti backend against the PyTorch reference on ragged inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastardiff.exporter.engine_modules import ENGINE_IO, example_inputs, make_engine_modules
from fastardiff.exporter.export import export_engines
from fastardiff.exporter.parity import with_room
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
    # --kv-update in-place: the AR engines also scatter their new keys/values into the caches they are given (the
    # suite's only AOTI compile; every run below, on these packages, is compared with the torch backend's)
    manifest, hit = export_engines(ckpt_path, out, ExportOptions(target="aoti", gamma=AOTI_GAMMA, kv_update="in-place"))
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
        arrays = [x.numpy() for x in inputs]
        if name != "decoder":   # in-place engines: caches with room for the fed positions (past lengths: masked)
            arrays[2:4] = with_room(arrays[2], arrays[3], k)
        got = getattr(engines, name)(*arrays)
        got = got if isinstance(got, tuple) else (got,)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-3)
    assert export_engines(ckpt_path, out, ExportOptions(target="aoti", gamma=AOTI_GAMMA,
                                                        kv_update="in-place"))[1] is True  # cache hit


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


@pytest.fixture(scope="module")
def aoti_in_place_dir(aoti_export):
    return aoti_export[1]


def test_aoti_in_place_engines_update_the_callers_buffer(aoti_in_place_dir, random_checkpoint):
    """The package writes new_k / new_v into the numpy buffer it was given (torch.from_numpy shares it), each row at
    its length, nothing else touched; outputs equal the PyTorch reference; a cache without room is refused."""
    from fastardiff.errors import EngineError

    engines = load_engines(aoti_in_place_dir)
    caps = engines.capabilities
    assert caps.kv_in_place == {"draft_step", "target_verify", "target_jacobi"} and caps.needs_cache_room
    assert engines.manifest.export["kv_update"] == "in-place"
    cfg = random_checkpoint.config
    tokens, lengths, k, v, cond = (x.numpy() for x in example_inputs(cfg, "target_verify", cfg.target_layers, 3, 4,
                                                                     40, seed=2))
    lengths[:] = [9, 0, 30]
    k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
    before = k.copy(), v.copy()
    modules = make_engine_modules(random_checkpoint.target, random_checkpoint.draft, random_checkpoint.decoder)
    with torch.no_grad():
        want = modules["target_verify"](*[torch.from_numpy(np.array(x)) for x in (tokens, lengths, k, v, cond)])
    got = engines.target_verify(tokens, lengths, k, v, cond)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-3)
    for old, new, written in zip(before, (k, v), (got.new_k, got.new_v)):
        expected = old.copy()
        for r, start in enumerate(lengths):
            expected[:, r, :, start:start + 4] = written[:, r]
        np.testing.assert_array_equal(new, expected)
    with pytest.raises(EngineError, match="no room"):
        engines.target_verify(tokens, lengths, k[:, :, :, :32].copy(), v[:, :, :, :32].copy(), cond)


def test_aoti_in_place_runs_equal_host_written_runs(aoti_in_place_dir):
    """Target-only, Jacobi and model-draft runs on the in-place packages (no host write for their calls at batch 1)
    give the tokens of the same packages with the host writing the cache after every call."""
    from fastardiff.runtime.speculative import GenerationConfig, generate

    engines, plain = load_engines(aoti_in_place_dir), load_engines(aoti_in_place_dir, in_place=False)
    assert plain.capabilities.kv_in_place == frozenset()
    for gen in (GenerationConfig(mode="target", seed=1), GenerationConfig(draft="jacobi", gamma=2, seed=1,
                                                                          cfg_scale=1.5),
                GenerationConfig(draft="model", gamma=1, seed=1, early_stop="off")):
        np.testing.assert_array_equal(generate(engines, np.array([6]), gen)[0], generate(plain, np.array([6]), gen)[0])


def test_aoti_device_cache_runs_equal_host_cache_runs(aoti_in_place_dir):
    """The caches kept as torch tensors where the engines run (`device_cache`, what a CUDA run does; here on the
    CPU, a storage apart from numpy) and updated there by the in-place packages, and with `device_loop` the
    loop's token buffer and every engine output too (runtime/arrays.py): the same tokens as numpy host caches
    and the numpy loop, at batch 3 (rows finish apart: gathered rows and ragged writes) and with guidance."""
    from fastardiff.runtime.speculative import GenerationConfig, generate

    device, host = load_engines(aoti_in_place_dir, device_cache=True), load_engines(aoti_in_place_dir)
    loop = load_engines(aoti_in_place_dir, device_loop=True)     # the loop's buffers and outputs there too
    on_device, on_host, device_loop = device.capabilities, host.capabilities, loop.capabilities
    assert on_device.cache_device is not None and on_host.cache_device is None and on_device.kv_in_place
    assert on_device.loop_device is None
    assert device_loop.loop_device is not None and device_loop.cache_device is not None
    for gen in (GenerationConfig(mode="target", seed=2), GenerationConfig(draft="jacobi", gamma=2, seed=2,
                                                                          cfg_scale=1.5),
                GenerationConfig(draft="model", gamma=1, seed=2, early_stop="off", engine_acceptance=True)):
        want = generate(host, np.array([1, 6, 9]), gen)[0]
        np.testing.assert_array_equal(generate(device, np.array([1, 6, 9]), gen)[0], want)
        np.testing.assert_array_equal(generate(loop, np.array([1, 6, 9]), gen)[0], want)


def test_aoti_cuda_graph_runs_equal_plain_runs(aoti_in_place_dir):
    """AotiEngines(cuda_graphs=True) with the stand-in capture (tests/test_device_cache.py EagerCapture: replays
    eagerly on the bucket's static buffers): caches on the device, the loop writing the new keys/values (a
    replay's own scatter lands in the bucket's copy), and the same tokens as the plain engines; a repeated run
    captures nothing new. Without CUDA or a stand-in: a clear error."""
    from test_device_cache import EagerCapture

    from fastardiff.errors import EngineError
    from fastardiff.runtime.speculative import GenerationConfig, generate

    graphed = load_engines(aoti_in_place_dir, cuda_graphs=True, graph_capture=EagerCapture())
    plain = load_engines(aoti_in_place_dir)
    assert graphed.capabilities.cache_device is not None and graphed.capabilities.kv_in_place == frozenset()
    for gen in (GenerationConfig(mode="target", seed=4), GenerationConfig(draft="jacobi", gamma=2, seed=4,
                                                                          cfg_scale=1.5),
                GenerationConfig(draft="model", gamma=1, seed=4, early_stop="off", engine_acceptance=False)):
        np.testing.assert_allclose(generate(graphed, np.array([2, 3, 8]), gen)[0],
                                   generate(plain, np.array([2, 3, 8]), gen)[0], atol=1e-5)
    captures = graphed.graphs.captures
    assert captures == len(graphed.graphs.buckets) > 0
    generate(graphed, np.array([2, 3, 8]), GenerationConfig(mode="target", seed=4))
    assert graphed.graphs.captures == captures
    with pytest.raises(EngineError, match="CUDA graphs need a CUDA device"):
        load_engines(aoti_in_place_dir, cuda_graphs=True)
