"""Every backend declares what its engines offer the loop in one complete `EngineCapabilities`
(runtime/capabilities.py), and the runtime reads it instead of probing the engines object."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import math
import re
from pathlib import Path

import numpy as np
import pytest

from fastardiff.runtime.capabilities import EngineCapabilities

FIELDS = {f.name for f in dataclasses.fields(EngineCapabilities)}
ROOT = Path(__file__).resolve().parents[1]


def engine_classes():
    """(name, class) of every backend in the registry that loads engines, and the torch reference backend."""
    from fastardiff.runtime.engine import BACKENDS

    out = []
    for name, spec in sorted(BACKENDS.items()):
        module, factory = spec.split(":")
        fn = getattr(importlib.import_module(module), factory)
        cls = inspect.signature(fn).return_annotation
        if isinstance(cls, str):
            cls = getattr(importlib.import_module(module), cls, None)
        if cls is not None and cls is not inspect.Signature.empty:
            out.append((name, cls))
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime.serve.merge import MergedEngines

    return out + [("torch", TorchEngines), ("serve-merged", MergedEngines)]


@pytest.mark.parametrize("name,cls", engine_classes(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_backend_fills_every_field_once(name, cls):
    """Read from the source (TensorRT and CUDA backends cannot load here): the class's __init__ makes exactly one
    EngineCapabilities with every field named (or from EngineCapabilities.host, whose fields are all set), and
    sets no loop capability as a loose attribute of its own."""
    tree = ast.parse(inspect.getsource(cls))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and (
        getattr(n.func, "id", None) == "EngineCapabilities" or getattr(n.func, "attr", None) == "host")]
    assert len(calls) == 1, f"{name}: {len(calls)} capabilities declarations"
    call = calls[0]
    named = {k.arg for k in call.keywords}
    if getattr(call.func, "attr", None) != "host":
        assert named == FIELDS, f"{name}: missing {sorted(FIELDS - named)}"
    loose = {t.attr for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
             if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == "self"} & FIELDS
    assert not loose, f"{name} sets {sorted(loose)} beside its capabilities"


def test_a_missing_or_inconsistent_field_is_refused():
    full = dataclasses.asdict(EngineCapabilities.host())
    del full["cache_limit"]
    with pytest.raises(TypeError, match="cache_limit"):
        EngineCapabilities(**full)
    for change, says in ((dict(loop_noise="gpu"), "loop_noise"), (dict(loop_device="cuda"), "loop_device"),
                         (dict(cache_pool=object(), cache_device="cuda"), "cache_pool"),
                         (dict(rollout_gammas=frozenset({0})), "rollout_gammas"), (dict(cache_limit=-1), "cache_limit")):
        with pytest.raises(ValueError, match=says):
            EngineCapabilities.host(**change)
    assert EngineCapabilities.host(cache_limit=math.inf).cache_limit == math.inf
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineCapabilities.host().cache_views = True


def check_agrees_with_engines(engines) -> None:
    """What the capabilities say is what the engines object runs."""
    caps = engines.capabilities
    assert isinstance(caps, EngineCapabilities)
    assert caps.rollout_gammas == set(engines.rollouts)
    assert caps.target_jacobi == (engines.target_jacobi is not None)
    assert caps.kv_in_place <= set(engines.manifest.engines)
    assert caps.needs_cache_room or not caps.kv_in_place
    assert isinstance(caps.summary(), dict) and set(caps.summary()) == FIELDS


def test_loaded_backends_agree_with_their_capabilities(random_checkpoint, shared_onnx_export):
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime.engine import load_engines

    torch_engines = TorchEngines(random_checkpoint, max_gamma=3)
    onnx = load_engines(shared_onnx_export[0])
    for engines in (torch_engines, TorchEngines(random_checkpoint, max_gamma=1, device_loop=True), onnx):
        check_agrees_with_engines(engines)
    assert torch_engines.capabilities.cache_views and torch_engines.capabilities.rollout_gammas == {1, 2, 3}
    caps = onnx.capabilities
    assert caps.cache_limit == math.inf and caps.cache_pool is not None and onnx.providers[0] == "CPUExecutionProvider"
    assert not caps.accelerator and caps.rollout_gammas == {1, 2}


def test_the_serving_merger_declares_the_engines_capabilities(random_checkpoint):
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime.serve.merge import EngineCallMerger

    engines = TorchEngines(random_checkpoint, max_gamma=2)
    with EngineCallMerger(engines).join() as merged:
        check_agrees_with_engines(merged)
        assert merged.capabilities.rollout_gammas == {1, 2} and not merged.capabilities.cache_views


def test_the_runtime_never_probes_the_engines_object():
    """No `getattr(engines, "feature", ...)` in the runtime or the exporter: what a backend offers is its
    capabilities (a contract method looked up by a variable name, as the serving merger does, is no probe).
    The one exception is not a capability: the execution providers and thread count that key a cached --gamma auto
    plan to this machine (plan_cache.plan_key and the serving merger that forwards them)."""
    identity = re.compile(r"getattr\((merger\.)?engines, \"(providers|threads)\"")
    probes = []
    for path in sorted([*ROOT.glob("runtime/**/*.py"), *ROOT.glob("exporter/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for probe in re.finditer(r"getattr\((self\.)?(_?engines|merger\.engines|inner)\s*,\s*[\"'][^)]*\)", line):
                if not identity.match(probe.group(0)):
                    probes.append(f"{rel}:{i}: {line.strip()}")
    assert not probes, "\n".join(probes)


def test_a_wrapper_without_capabilities_is_a_clear_error(random_checkpoint):
    """Engines without a capabilities object fail at once (AttributeError naming it), not with a default that
    silently runs the loop another way."""
    from fastardiff.exporter.torch_backend import TorchEngines
    from fastardiff.runtime.generation import GenerationConfig
    from fastardiff.runtime.speculative import generate

    inner = TorchEngines(random_checkpoint, max_gamma=2)

    class Bare:
        manifest = inner.manifest
        target_verify, draft_step, decoder = inner.target_verify, inner.draft_step, inner.decoder

    with pytest.raises(AttributeError, match="capabilities"):
        generate(Bare(), np.array([1]), GenerationConfig(mode="target", num_tokens=2))
