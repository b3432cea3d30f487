"""The standard-TensorRT engine builder (exporter/trt_build.build_engine) and the runtime's engine runner driven
through recorded stand-ins of the TensorRT Python API, in its 10.16 and its 11.1 surface (tests/trt_standin.py):
standard TensorRT builds and runs only on a GPU, so this checks call sequences, flags, profiles, timing-cache
handling, streams and buffer binding, not TensorRT itself. TensorRT-RTX, which builds without a GPU, is tested for
real in tests/test_trt_rtx.py."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from trt_standin import SURFACES, StandInEngine, StandInKVEngine, StandInStream, StandInTensorRT


@pytest.fixture
def draft_shapes(tiny_config):
    from fastardiff.exporter.engine_modules import shape_profiles
    from fastardiff.exporter.trt_target import profile_shapes

    return profile_shapes(tiny_config.to_dict(), "draft_step", tiny_config.draft_layers,
                          shape_profiles(tiny_config, 4, 3)["draft_step"])


def build(trt, tmp_path, shapes, precision="fp32", kept=b"previous"):
    from fastardiff.exporter.trt_build import build_engine

    cache = tmp_path / ".timing.cache"
    if kept is not None:
        cache.write_bytes(kept)
    build_engine(trt, "logger", tmp_path / "m.onnx", tmp_path / "m.engine", shapes, precision, cache, "draft_step")
    return cache


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_build_engine_strongly_typed_without_precision_flags(tmp_path, draft_shapes, surface, precision):
    trt = StandInTensorRT(surface)
    cache = build(trt, tmp_path, draft_shapes, precision)
    assert (tmp_path / "m.engine").read_bytes() == b"serialized-engine"
    assert trt.calls.index("OnnxParser") < trt.calls.index("build_serialized_network")
    assert f"parse_from_file {tmp_path / 'm.onnx'}" in trt.calls
    # the strongly typed bit, from each release's own enum value (10.16: 1 << 1, 11.1: 1 << 0)
    assert trt.calls[1] == f"create_network {2 if surface == '10.16' else 1}" and trt.network.strongly_typed
    # no FP16/BF16 flag ever; TF32 (on by default) cleared for fp32 only
    assert trt.config.flags == (set() if precision == "fp32" else {trt.BuilderFlag.TF32})
    assert "set_timing_cache b'previous' False -> True" in trt.calls      # the kept cache is reused ...
    assert cache.read_bytes() == b"previous+tuned"                         # ... and updated after the build
    assert trt.shapes == draft_shapes and set(draft_shapes) == {"tokens", "lengths", "k_cache", "v_cache", "cond"}
    assert isinstance(trt.monitor, trt.IProgressMonitor) and trt.monitor.step_complete("phase", 1) is True


def test_standin_refuses_precision_flags_on_a_strongly_typed_network(tmp_path, draft_shapes, monkeypatch):
    """The stand-in is strict where TensorRT is: 10.x fails the build with FP16 set, 11.x has no FP16 flag."""
    from fastardiff.errors import FastardiffError
    from fastardiff.exporter import trt_build

    old = StandInTensorRT("10.16")
    monkeypatch.setattr(trt_build, "configure_precision",
                        lambda trt, config, precision: config.set_flag(trt.BuilderFlag.FP16))
    with pytest.raises(FastardiffError, match="failed to build 'draft_step'"):
        build(old, tmp_path, draft_shapes, "fp16")
    assert "error: precision flags are not allowed with a strongly typed network" in old.calls
    with pytest.raises(AttributeError):
        StandInTensorRT("11.1").BuilderFlag.FP16  # noqa: B018


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("policy,kept,attached,saved", [
    ("reject_kept", b"other-gpu", "b''", b"+tuned"),      # set_timing_cache False -> a fresh cache
    ("unreadable", b"damaged", "b''", b"+tuned"),         # create_timing_cache None -> a fresh cache
    ("accept", None, "b''", b"+tuned"),                   # no file yet: a fresh cache, then kept
    ("reject_all", b"other-gpu", None, b"other-gpu"),     # nothing attached: get_timing_cache None, file untouched
])
def test_timing_cache_falls_back_to_a_fresh_cache(tmp_path, draft_shapes, caplog, surface, policy, kept, attached,
                                                  saved):
    trt = StandInTensorRT(surface, cache_policy=policy)
    with caplog.at_level(logging.WARNING, logger="fastardiff.export"):
        cache = build(trt, tmp_path, draft_shapes, kept=kept)
    assert (tmp_path / "m.engine").exists()
    sets = [c for c in trt.calls if c.startswith("set_timing_cache")]
    if attached is None:
        assert trt.config.get_timing_cache() is None and all(c.endswith("-> False") for c in sets)
        assert "building without one" in caplog.text
    else:
        assert sets[-1] == f"set_timing_cache {attached} False -> True"
    assert cache.read_bytes() == saved
    if kept and policy != "accept":
        assert "refused the timing cache '.timing.cache'" in caplog.text


def test_timing_cache_file_is_keyed_by_gpu_name(tmp_path):
    from fastardiff.exporter.trt_build import timing_cache_path

    trt = StandInTensorRT("11.1")
    h100 = timing_cache_path(tmp_path / "work", trt, {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    gh200 = timing_cache_path(tmp_path / "work", trt, {"name": "NVIDIA GH200 480GB", "compute_capability": "9.0"})
    assert h100 != gh200 and h100.parent == tmp_path
    assert h100.name == ".fastardiff-trt-timing-11.1.0-nvidia-h100-80gb-hbm3-sm90.cache"


def test_build_engine_reports_parser_errors(tmp_path):
    from fastardiff.errors import FastardiffError
    from fastardiff.exporter.trt_build import build_engine

    with pytest.raises(FastardiffError, match="could not parse 'm.onnx'.*Plugin not found"):
        build_engine(StandInTensorRT(parse_ok=False), "logger", tmp_path / "m.onnx", tmp_path / "m.engine", {},
                     "fp32", tmp_path / "cache", "x")
    assert not (tmp_path / "m.engine").exists()


# ---------------------------------------------------------------------------------------------- runner

def make_runner(events=None):
    from fastardiff.runtime.backend_tensorrt import TensorRTRunner

    events = [] if events is None else events
    engine = StandInEngine(events)
    runner = TensorRTRunner(StandInEngine, torch, engine, StandInStream("engine", events), "draft_step",
                            ["tokens", "lengths"], ["mean", "entropy"], device="cpu")
    return runner, engine, events


def aligned(x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """A copy of x whose storage starts `offset` bytes past a 256-byte boundary."""
    raw = torch.empty(x.numel() * x.element_size() + 512, dtype=torch.uint8)
    start = (-raw.data_ptr()) % 256 + offset
    out = raw[start:start + x.numel() * x.element_size()].view(x.dtype).view(x.shape)
    out.copy_(x)
    return out


def test_runner_binds_by_address_in_contract_order():
    from fastardiff.errors import EngineError
    from fastardiff.runtime.backend_tensorrt import TensorRTRunner

    runner, engine, _ = make_runner()
    tokens = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    lengths = np.array([5, 7])  # int64, as the runtime passes them
    mean, entropy = runner([tokens, lengths])
    np.testing.assert_array_equal(mean, tokens * 2)
    np.testing.assert_array_equal(entropy, tokens.sum(-1) + lengths[:, None])
    assert engine.shapes == {"tokens": (2, 3, 4), "lengths": (2,)}
    assert all(a % 256 == 0 for a in engine.addresses.values())
    with pytest.raises(EngineError, match="outside the optimisation profile"):
        runner([np.zeros((9, 3, 4), np.float32), np.zeros(9, np.int64)])
    with pytest.raises(EngineError, match="expected"):
        TensorRTRunner(StandInEngine, torch, StandInEngine(), StandInStream("s", []), "x", ["tokens", "cond"], None,
                       device="cpu")


def test_runner_binds_aligned_tensors_in_place_and_copies_the_rest():
    runner, engine, _ = make_runner()
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    lengths = aligned(torch.tensor([5, 7]))
    in_place = aligned(tokens)
    runner.run_device([in_place, lengths])
    assert engine.addresses["tokens"] == in_place.data_ptr() and engine.addresses["lengths"] == lengths.data_ptr()
    for bad in (aligned(tokens, offset=64), aligned(tokens.transpose(1, 2).contiguous()).transpose(1, 2),
                aligned(tokens).double()):  # misaligned, not contiguous, another dtype
        mean, entropy = runner.run_device([bad, lengths])
        assert engine.addresses["tokens"] != bad.data_ptr() and engine.addresses["tokens"] % 256 == 0
        torch.testing.assert_close(mean, bad.float() * 2)
        torch.testing.assert_close(entropy, bad.float().sum(-1) + lengths[:, None].float())


def test_runner_gives_zero_element_tensors_a_valid_address():
    runner, engine, _ = make_runner()
    mean, entropy = runner([np.zeros((2, 0, 4), np.float32), np.array([3, 4])])
    assert mean.shape == (2, 0, 4) and entropy.shape == (2, 0) and engine.executed == 1
    assert engine.addresses["tokens"] and engine.addresses["mean"] and engine.addresses["entropy"]
    assert engine.addresses["tokens"] % 256 == 0


def test_runner_orders_the_engine_stream_after_the_callers():
    """The engine stream waits on the caller's stream before the enqueue; the caller's waits on the engine's
    after it; no host synchronisation in run_device."""
    runner, engine, events = make_runner()
    caller = StandInStream("caller", events)
    runner.run_device([np.ones((1, 2, 4), np.float32), np.array([1])], caller_stream=caller)
    assert events == ["engine waits caller", "execute", "caller waits engine"]


def test_runner_host_calls_allocate_nothing_at_a_shape_seen_before(monkeypatch):
    """Host-facing calls stage inputs and take outputs in pooled aligned buffers: after the first call at a
    shape, repeated calls allocate nothing and still return fresh, correct host arrays; a new shape allocates
    once more. run_device (outputs the caller keeps) gets new buffers every time."""
    runner, engine, _ = make_runner()
    allocations = []
    real = runner._aligned_empty
    monkeypatch.setattr(runner, "_aligned_empty", lambda shape, dtype: allocations.append(shape) or real(shape, dtype))
    tokens = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    first = runner([tokens, np.array([5, 7])])
    assert len(allocations) == 4                      # two staged inputs, two outputs
    second = runner([tokens + 1, np.array([1, 2])])
    assert len(allocations) == 4 and engine.executed == 2
    np.testing.assert_array_equal(first[0], tokens * 2)             # the first result was not overwritten
    np.testing.assert_array_equal(second[0], (tokens + 1) * 2)
    np.testing.assert_array_equal(second[1], (tokens + 1).sum(-1) + np.array([1, 2])[:, None])
    runner([np.zeros((1, 3, 4), np.float32), np.array([0])])
    assert len(allocations) == 8
    kept = runner.run_device([tokens, np.array([5, 7])])
    again = runner.run_device([tokens, np.array([5, 7])])
    assert kept[0].data_ptr() != again[0].data_ptr()


def test_runner_keeps_outputs_where_the_loop_wants_them():
    """run_for_loop (the tensorrt backend's engine call): numpy tokens -> host outputs, except the last `keep`
    (new keys/values of device caches) left as device tensors; torch tokens (the device loop) -> every output a
    device tensor; the values are the same either way."""
    from fastardiff.runtime.backend_tensorrt import run_for_loop

    runner, _, _ = make_runner()
    tokens = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    lengths = np.array([5, 7])
    host = run_for_loop(runner, [tokens, lengths], keep=0)
    assert all(isinstance(o, np.ndarray) for o in host)
    mixed = run_for_loop(runner, [tokens, lengths], keep=1)
    assert isinstance(mixed[0], np.ndarray) and isinstance(mixed[1], torch.Tensor)
    device = run_for_loop(runner, [torch.from_numpy(tokens), torch.from_numpy(lengths)], keep=1)
    assert all(isinstance(o, torch.Tensor) for o in device)
    for a, b, c in zip(host, mixed, device):
        np.testing.assert_array_equal(a, np.asarray(b))
        np.testing.assert_array_equal(a, c.numpy())


# ---------------------------------------------------------------------------------------------- in-place KV

KV_INPUTS = ["tokens", "lengths", "k_cache_0", "v_cache_0"]
KV_OUTPUTS = ["mean", "new_k", "new_v", "k_cache_out_0", "v_cache_out_0"]


def kv_runner(engine_aliases=StandInKVEngine.ALIASES, contract=StandInKVEngine.ALIASES):
    from fastardiff.runtime.backend_tensorrt import TensorRTRunner

    engine = StandInKVEngine(aliases=engine_aliases)
    return TensorRTRunner(StandInEngine, torch, engine, StandInStream("engine", []), "target_verify", KV_INPUTS,
                          KV_OUTPUTS, device="cpu", aliases=contract), engine


def kv_call(tokens, lengths, k_cache, v_cache):
    """What the cache holds after the call: the new keys (tokens) / values (-tokens) at each row's length."""
    want_k, want_v = np.array(k_cache, copy=True), np.array(v_cache, copy=True)
    for r, start in enumerate(lengths):
        want_k[0, r, 0, start:start + tokens.shape[1]] = tokens[r]
        want_v[0, r, 0, start:start + tokens.shape[1]] = -tokens[r]
    return want_k, want_v


@pytest.mark.parametrize("engine_reports_aliases", [True, False], ids=["get_aliased_input_tensor", "contract"])
def test_in_place_engine_updates_the_callers_cache_where_it_lies(engine_reports_aliases):
    """An in-place engine's cache outputs are bound to the caller's cache layers themselves (a 256-byte aligned
    device buffer: no copy, the engine's write lands there); host (numpy) caches are staged and written back.
    run_engine returns the contract outputs only, with the updated caches in the caller's memory either way."""
    from fastardiff.runtime.backend_tensorrt import run_engine
    from fastardiff.runtime.manifest import EngineEntry

    runner, engine = kv_runner(StandInKVEngine.ALIASES if engine_reports_aliases else None)
    entry = EngineEntry(file="x", sha256="0", inputs=KV_INPUTS, outputs=KV_OUTPUTS, cache_layers=1)
    g = np.random.default_rng(0)
    tokens = g.standard_normal((2, 3, 4)).astype(np.float32)
    lengths = np.array([5, 1])
    k_host, v_host = (g.standard_normal((1, 2, 1, 9, 4)).astype(np.float32) for _ in range(2))
    want_k, want_v = kv_call(tokens, lengths, k_host, v_host)
    k_dev, v_dev = aligned(torch.from_numpy(k_host)), aligned(torch.from_numpy(v_host))
    out = run_engine(runner, entry, (tokens, lengths, k_host, v_host), device_cache=False)
    assert len(out) == 3
    np.testing.assert_array_equal(out[0], 2 * tokens)
    np.testing.assert_array_equal(k_host, want_k)
    np.testing.assert_array_equal(v_host, want_v)          # written back into the host cache
    out = run_engine(runner, entry, (tokens, lengths, k_dev, v_dev), device_cache=True)
    assert engine.addresses["k_cache_out_0"] == engine.addresses["k_cache_0"] == k_dev[0].data_ptr()
    assert engine.addresses["v_cache_out_0"] == v_dev[0].data_ptr()
    np.testing.assert_array_equal(k_dev.numpy(), want_k)
    np.testing.assert_array_equal(v_dev.numpy(), want_v)
    assert isinstance(out[1], torch.Tensor) and len(out) == 3   # new keys stay where the device caches are
    # a cache that cannot be bound where it lies (misaligned) is staged on the device and still updated
    k_bad = aligned(torch.from_numpy(k_host), offset=64)
    before = k_bad.clone()
    run_engine(runner, entry, (tokens, np.array([0, 2]), k_bad, v_dev), device_cache=True)
    assert engine.addresses["k_cache_0"] != k_bad[0].data_ptr()
    np.testing.assert_array_equal(k_bad.numpy(), kv_call(tokens, [0, 2], before.numpy(), v_host)[0])


def test_in_place_engine_needs_room_and_matching_aliases():
    from fastardiff.errors import EngineError
    from fastardiff.runtime.backend_tensorrt import run_engine
    from fastardiff.runtime.manifest import EngineEntry

    runner, engine = kv_runner()
    entry = EngineEntry(file="x", sha256="0", inputs=KV_INPUTS, outputs=KV_OUTPUTS, cache_layers=1)
    cache = np.zeros((1, 2, 1, 6, 4), np.float32)
    with pytest.raises(EngineError, match="no room for 3 tokens fed at length 5"):
        run_engine(runner, entry, (np.zeros((2, 3, 4), np.float32), np.array([5, 1]), cache, cache.copy()), False)
    assert engine.executed == 0
    with pytest.raises(EngineError, match="aliases input 'v_cache_0' in the engine but None in the manifest"):
        kv_runner(contract={"k_cache_out_0": "k_cache_0"})
    with pytest.raises(EngineError, match="lacks the in-place cache tensors"):
        kv_runner(engine_aliases=None, contract={**StandInKVEngine.ALIASES, "k_cache_out_1": "k_cache_1"})
