"""The `trt` target without TensorRT: the --onnx-only graph carries the plugin nodes the TensorRT parser and the
plugin creator read; swapped back to the reference it matches the `onnx` export numerically (ONNX Runtime);
clear errors for a missing tensorrt package, an unbuilt --onnx-only directory, and the backend's version/plugin checks.
(What runs on a TensorRT machine is only compiled/inspected here: docs/backends.md, "What ran where, and what did not".)"""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from fastardiff.errors import EngineError, MissingDependencyError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
IN_PLACE_ENGINES = ("draft_step", "target_verify", "target_jacobi")


@pytest.fixture(scope="session")
def trt_onnx_dir(random_checkpoint_path, tmp_path_factory):
    from fastardiff.exporter.export import export_engines
    from fastardiff.exporter.targets import ExportOptions

    out = tmp_path_factory.mktemp("trt") / "engines"
    manifest, hit = export_engines(random_checkpoint_path, out, ExportOptions(target="trt", onnx_only=True, gamma=2))
    assert not hit
    return out, manifest


def load(dir_, manifest, name):
    return onnx.load(str(dir_ / manifest.engines[name].file))


def test_onnx_only_graph_carries_plugin_nodes(trt_onnx_dir, random_checkpoint, tiny_config):
    from fastardiff.exporter.trt_graph import PLUGIN_DOMAIN, check_plugin_graph, plugin_nodes

    out, manifest = trt_onnx_dir
    assert manifest.backend == "tensorrt-onnx"
    assert manifest.plugin == {"name": "EntropyAttention", "namespace": "fastardiff", "version": "1"}
    # entropy layers per model: draft 2 layers -> entropy and shallow layer coincide, one node; the target engines
    # compute the entropy layer's entropy only (their contract has no shallow entropy; its shallow layer 1 differs
    # from its entropy layer 2, so it attends like a plain layer there)
    target = random_checkpoint.target
    assert target.shallow_layer != target.entropy_layer
    expected = {"draft_step": len({random_checkpoint.draft.entropy_layer, random_checkpoint.draft.shallow_layer}),
                "target_verify": 1, "decoder": 0}
    # a draft_rollout of length g calls the draft g times: g times the draft's plugin nodes
    expected.update({f"draft_rollout_{g}": g * expected["draft_step"] for g in (1, 2)})
    expected["target_jacobi"] = expected["target_verify"]      # the target once, sampling around it
    assert manifest.export["plugin_nodes"] == expected
    for name, count in expected.items():
        model = load(out, manifest, name)
        onnx.checker.check_model(model)
        check_plugin_graph(model)  # everything else is a standard op
        nodes = plugin_nodes(model)
        assert len(nodes) == count
        graph_inputs = {i.name: i for i in model.graph.input}
        producers = {o: n for n in model.graph.node for o in n.output}
        for node in nodes:
            attrs = {a.name: a for a in node.attribute}
            assert node.op_type == "EntropyAttention" and node.domain == PLUGIN_DOMAIN
            assert attrs["plugin_namespace"].type == onnx.AttributeProto.STRING
            assert helper.get_attribute_value(attrs["plugin_namespace"]) == b"fastardiff"
            assert helper.get_attribute_value(attrs["plugin_version"]) == b"1"
            assert attrs["scale"].type == onnx.AttributeProto.FLOAT   # parser -> PluginField kFLOAT32
            assert attrs["scale"].f == pytest.approx(tiny_config.head_dim ** -0.5)
            assert attrs["normalize"].type == onnx.AttributeProto.INT and attrs["normalize"].i == 1
            assert set(attrs) == {"scale", "normalize", "in_buffer", "plugin_namespace", "plugin_version"}
            q, k, v, lengths = node.input
            assert lengths == "lengths" and graph_inputs["lengths"].type.tensor_type.elem_type == onnx.TensorProto.INT64
            if name in IN_PLACE_ENGINES:
                # the default --kv-update in-place: keys are the layer's buffer after its TensorScatter (axis -2,
                # the form TensorRT's parser turns into an IKVCacheUpdateLayer), read with in_buffer = 1
                assert attrs["in_buffer"].i == 1
                for buffer in (k, v):
                    scatter = producers[buffer]
                    assert scatter.op_type == "TensorScatter" and scatter.input[0] in graph_inputs
                    assert helper.get_attribute_value(scatter.attribute[0]) == -2
            else:
                # keys are [cache, new tokens] so the plugin's causal_offset = T - K is the cache length
                assert attrs["in_buffer"].i == 0
                assert producers[k].op_type == "Concat" and producers[v].op_type == "Concat"
        if name in IN_PLACE_ENGINES:
            layers = manifest.engines[name].cache_layers
            assert layers == (random_checkpoint.draft.num_layers if name == "draft_step"
                              else random_checkpoint.target.num_layers)
            assert manifest.engines[name].outputs[-1] == f"v_cache_out_{layers - 1}"
            assert sum(n.op_type == "TensorScatter" for n in model.graph.node) == 2 * layers
            # the profile takes the runtime's whole buffer: room for the fed positions past the sequence
            profile = manifest.engines[name].profile
            assert profile["cache"][2] == tiny_config.seq_len + profile["K"][2]
        if count:
            assert any(o.domain == PLUGIN_DOMAIN for o in model.opset_import)


def _ragged_inputs(cfg, layers, batch, k, cache, seed):
    from fastardiff.exporter.engine_modules import example_inputs

    inputs = example_inputs(cfg, "target_verify", layers, batch, k, cache, seed=seed)
    return inputs


def _session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feed(session, inputs):
    return {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}


def _decomposed(model, name, layers):
    """The decomposed plugin graph as a contract call (per-layer buffers with room; updates checked each call)."""
    from fastardiff.exporter.onnx_target import ort_runner

    return ort_runner(model.SerializeToString(), name, "cpu", layers)


@pytest.fixture(scope="module")
def reference_modules(random_checkpoint):
    """draft_step / target_verify as the PyTorch reference modules every export is checked against (comparing
    with them directly spares a second ONNX export of the same engines)."""
    from fastardiff.exporter.engine_modules import make_engine_modules

    ck = random_checkpoint
    return make_engine_modules(ck.target, ck.draft, ck.decoder)


@pytest.mark.parametrize("name", ["draft_step", "target_verify"])
def test_decomposed_plugin_graph_matches_the_reference(trt_onnx_dir, reference_modules, random_checkpoint,
                                                       tiny_config, name):
    from fastardiff.exporter.trt_graph import decompose_plugin_nodes, plugin_nodes

    out, manifest = trt_onnx_dir
    decomposed = decompose_plugin_nodes(load(out, manifest, name))
    assert not plugin_nodes(decomposed)
    onnx.checker.check_model(decomposed)
    layers = random_checkpoint.draft.num_layers if name == "draft_step" else random_checkpoint.target.num_layers
    run = _decomposed(decomposed, name, manifest.engines[name].cache_layers)
    for batch, k, cache, seed in [(3, 5, 40, 1), (2, 1, 63, 2), (4, 17, 0, 3)]:
        inputs = _ragged_inputs(tiny_config, layers, batch, k, cache, seed)
        got = run(inputs)
        with torch.no_grad():
            ref = [t.numpy() for t in reference_modules[name](*inputs)]
        for g, r, out_name in zip(got, ref, manifest.engines[name].outputs):
            np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4, err_msg=f"{name}.{out_name} batch={batch} K={k}")
    assert manifest.engines[name].parity["outputs"]["entropy"]["mismatches"] == 0
    assert "swapped back" in manifest.engines[name].parity["runtime"]


def test_plugin_attributes_drive_the_comparison(trt_onnx_dir, tiny_config, random_checkpoint):
    """A wrong scale, normalize or in_buffer attribute changes the entropy: the swap-back really reads the plugin
    attributes."""
    from fastardiff.exporter.trt_graph import decompose_plugin_nodes, plugin_nodes

    out, manifest = trt_onnx_dir
    layers = manifest.engines["target_verify"].cache_layers
    inputs = _ragged_inputs(tiny_config, random_checkpoint.target.num_layers, 3, 5, 40, 1)
    base = _decomposed(decompose_plugin_nodes(load(out, manifest, "target_verify")), "target_verify", layers)(inputs)[1]
    for attr, value in (("scale", 0.5), ("normalize", 0), ("in_buffer", 0)):
        model = load(out, manifest, "target_verify")
        for node in plugin_nodes(model):
            for a in node.attribute:
                if a.name == attr:
                    a.CopyFrom(helper.make_attribute(attr, value))
        bad = _decomposed(decompose_plugin_nodes(model), "target_verify", layers)(inputs)[1]
        # (the random model's attention is near uniform: reading other keys moves its entropy by ~1e-3)
        assert np.abs(bad - base).max() > (5e-4 if attr == "in_buffer" else 1e-2), attr


@pytest.mark.parametrize("in_buffer", [False, True])
def test_decomposed_plugin_node_is_the_reference(in_buffer):
    """One EntropyAttention node, swapped back to standard ops, equals the reference on ragged rows: keys
    [cache, new tokens] (offset T - K), or a buffer holding the new tokens at each row's length (offset None)."""
    from fastardiff.exporter import trt_graph
    from fastardiff.recipes.entropy_attention import entropy_attention_reference

    trt_graph.register_onnx_schema()
    f = onnx.TensorProto.FLOAT
    node = helper.make_node("EntropyAttention", ["q", "k", "v", "lengths"], ["out", "entropy"],
                            domain=trt_graph.PLUGIN_DOMAIN, scale=0.25, normalize=1, in_buffer=int(in_buffer))
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info(n, f, None) for n in "qkv"]
                              + [helper.make_tensor_value_info("lengths", onnx.TensorProto.INT64, None)],
                              [helper.make_tensor_value_info(n, f, None) for n in ("out", "entropy")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(trt_graph.PLUGIN_DOMAIN, 1)])
    session = _session(trt_graph.decompose_plugin_nodes(model))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 5, 16, generator=g)
    k, v = torch.randn(3, 4, 14, 16, generator=g), torch.randn(3, 4, 14, 16, generator=g)
    lengths = torch.tensor([9, 2, 0])
    got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "lengths": lengths.numpy()})
    ref = entropy_attention_reference(q, k, v, lengths, None if in_buffer else 9, 0.25, True)
    other = entropy_attention_reference(q, k, v, lengths, 9 if in_buffer else None, 0.25, True)
    for g_, r, o in zip(got, ref, other):
        np.testing.assert_allclose(g_, r.numpy(), atol=1e-5, rtol=1e-5)
        assert np.abs(g_ - o.numpy()).max() > 1e-3      # the two layouts differ on these rows
    # the plugin op (what the export traces) is the same reference
    torch.testing.assert_close(trt_graph.entropy_attention_plugin(q, k, v, lengths, None if in_buffer else 9, 0.25),
                               ref)


def test_plugin_impl_matches_reference_and_checks_offset():
    from fastardiff.exporter import trt_graph
    from fastardiff.recipes.entropy_attention import ENTROPY_ATTENTION_IMPLS, entropy_attention_reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=g)
    k, v = torch.randn(2, 4, 12, 16, generator=g), torch.randn(2, 4, 12, 16, generator=g)
    lengths = torch.tensor([7, 3])
    got = ENTROPY_ATTENTION_IMPLS["plugin"](q, k, v, lengths, 7, 0.25, True)
    ref = entropy_attention_reference(q, k, v, lengths, 7, 0.25, True)
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="T - K"):
        trt_graph.entropy_attention_plugin(q, k, v, lengths, 6, 0.25, True)


def test_profile_shapes_follow_the_engine_contract(tiny_config):
    from fastardiff.exporter.engine_modules import shape_profiles
    from fastardiff.exporter.trt_target import profile_shapes

    profile = shape_profiles(tiny_config, 8, 4)["target_verify"]
    shapes = profile_shapes(tiny_config.to_dict(), "target_verify", tiny_config.target_layers, profile)
    assert list(shapes) == ["tokens", "lengths", "k_cache", "v_cache", "cond"]
    lo, opt, hi = shapes["k_cache"]
    assert lo == (tiny_config.target_layers, 1, tiny_config.heads, 0, tiny_config.head_dim)
    assert hi == (tiny_config.target_layers, 8, tiny_config.heads, tiny_config.seq_len, tiny_config.head_dim)
    assert shapes["tokens"][1] == (4, 5, tiny_config.token_dim)  # opt K = gamma + 1
    # target_jacobi's residual proposals: the profile spans every count the runtime feeds, on a GPU or a CPU
    from fastardiff.runtime.jacobi import PROPOSAL_RANGE, residual_proposals

    jacobi = profile_shapes(tiny_config.to_dict(), "target_jacobi", tiny_config.target_layers,
                            shape_profiles(tiny_config, 8, 4)["target_jacobi"])
    lo, opt, hi = (shape[2] for shape in jacobi["residual_noise"])
    assert (lo, hi) == PROPOSAL_RANGE and lo <= opt <= hi
    for rows in (1, 3, 8, 64, 1000):
        assert lo <= residual_proposals(rows) <= hi and lo <= residual_proposals(rows, accelerator=True) <= hi
    dec = profile_shapes(tiny_config.to_dict(), "decoder", 0, shape_profiles(tiny_config, 8, 4)["decoder"])
    assert dec["tokens"][2] == (8, tiny_config.num_tokens, tiny_config.token_dim)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_target_trt_without_tensorrt_says_onnx_only(random_checkpoint_path, tmp_path, capsys):
    from fastardiff.cli import main

    out = tmp_path / "engines"
    with pytest.raises(SystemExit) as exc:
        main(["export", "--target", "trt", "--ckpt", str(random_checkpoint_path), "--out", str(out),
              "--trt-library", "tensorrt"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "tensorrt" in err and "--onnx-only" in err and "pip install 'fastardiff[trt]'" in err
    assert not out.exists()


def test_onnx_only_dir_is_refused_by_the_runtime(trt_onnx_dir):
    from fastardiff.runtime.engine import load_engines

    out, _ = trt_onnx_dir
    with pytest.raises(EngineError, match="--onnx-only.*trtexec|not engines"):
        load_engines(out)


def _tensorrt_manifest(trt_onnx_dir, tmp_path, **changes):
    """A copy of the onnx-only dir relabelled as built engines (files stay valid: the checks run before parsing)."""
    import shutil

    out, _ = trt_onnx_dir
    fake = tmp_path / "engines"
    shutil.copytree(out, fake)
    data = json.loads((fake / "manifest.json").read_text())
    data.update({"backend": "tensorrt", "plugin": {"file": "libfastardiff_trt_plugin.so", "sha256": "0" * 64}})
    data["library_versions"]["tensorrt"] = "10.16.1"
    data.update(changes)
    (fake / "manifest.json").write_text(json.dumps(data))
    return fake


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_tensorrt_backend_without_tensorrt_is_missing_dependency(trt_onnx_dir, tmp_path):
    from fastardiff.runtime.engine import load_engines

    with pytest.raises(MissingDependencyError, match="tensorrt.*fastardiff\\[trt\\]"):
        load_engines(_tensorrt_manifest(trt_onnx_dir, tmp_path))


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """A stand-in `tensorrt` module with only a version and a Builder attribute: enough for the checks that run
    before any GPU work (the real API calls after them are not exercised here)."""
    module = types.ModuleType("tensorrt")
    module.__version__ = "10.16.1"
    module.Builder = object
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.delenv("FASTARDIFF_TRT_PLUGIN", raising=False)
    return module


def test_tensorrt_backend_refuses_other_tensorrt_version(trt_onnx_dir, tmp_path, fake_tensorrt):
    from fastardiff.runtime.engine import load_engines

    fake_tensorrt.__version__ = "10.9.0"
    with pytest.raises(EngineError, match="TensorRT 10.16.1, this is TensorRT 10.9.0.*--force"):
        load_engines(_tensorrt_manifest(trt_onnx_dir, tmp_path))


def test_tensorrt_backend_names_missing_plugin_and_cmake(trt_onnx_dir, tmp_path, fake_tensorrt):
    from fastardiff.runtime.engine import load_engines

    fake = _tensorrt_manifest(trt_onnx_dir, tmp_path)
    with pytest.raises(EngineError, match="libfastardiff_trt_plugin.so' is missing.*cmake -S . -B build/plugin"):
        load_engines(fake)
    (fake / "libfastardiff_trt_plugin.so").write_bytes(b"not the library the engines were built with")
    with pytest.raises(EngineError, match="sha256 mismatch"):
        load_engines(fake)


def test_placeholder_tensorrt_package_is_missing_dependency(monkeypatch):
    from fastardiff.runtime.backend_tensorrt import import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # like the PyPI stub packages
    with pytest.raises(MissingDependencyError, match="placeholder"):
        import_tensorrt("running TensorRT engines")


def test_target_trt_without_plugin_library_names_cmake(random_checkpoint_path, tmp_path, fake_tensorrt, monkeypatch):
    """With tensorrt importable, a missing plugin build is reported before any export work."""
    from fastardiff.errors import FastardiffError
    from fastardiff.exporter.export import export_engines
    from fastardiff.exporter.targets import ExportOptions

    monkeypatch.setenv("FASTARDIFF_TRT_PLUGIN", str(tmp_path / "nowhere" / "libfastardiff_trt_plugin.so"))
    out = tmp_path / "engines"
    missing = "nowhere/libfastardiff_trt_plugin.so' not found.*cmake -S . -B build/plugin"
    with pytest.raises(FastardiffError, match=missing):
        export_engines(random_checkpoint_path, out, ExportOptions(target="trt", trt_library="tensorrt"))
    assert not out.exists()


def test_fp16_plugin_graph_feeds_half_tensors(random_checkpoint, tmp_path, tiny_config, monkeypatch):
    """--precision fp16: the graph is fp16-typed (what a strongly typed TensorRT build computes in): fp16 weights,
    the plugin nodes take float16 q/k/v (the plugin's fp16 kernel) and int64 lengths; the graph, swapped back to the
    reference, stays within fp16 tolerance of the fp32 PyTorch model. An fp32-typed graph is refused for fp16."""
    from fastardiff.exporter.engine_modules import shape_profiles
    from fastardiff.exporter.targets import ExportOptions, engine_modules, trace_inputs
    from fastardiff.exporter.trt_graph import (check_graph_precision, decompose_plugin_nodes, plugin_nodes,
                                               weight_precisions)
    from fastardiff.exporter import trt_target
    from fastardiff.exporter.trt_target import export_plugin_onnx

    opts = ExportOptions(target="trt", precision="fp16", onnx_only=True)
    modules, references = engine_modules(random_checkpoint, opts)
    profile = shape_profiles(tiny_config, 8, 4)["target_verify"]
    layers = tiny_config.target_layers
    path = tmp_path / "target_verify.onnx"
    assert export_plugin_onnx("target_verify", modules["target_verify"], trace_inputs(tiny_config, "target_verify",
                              layers, profile), profile, path, "fp16") == 1     # its entropy layer only
    model = onnx.load(str(path))
    assert set(weight_precisions(model)) == {"fp16"}
    with pytest.raises(ValueError, match="weights are mostly fp16.*not fp32"):
        check_graph_precision(model, "fp32", "target_verify")
    # the export itself refuses a graph typed otherwise than asked (the ONNX export step replaced by the file above)
    monkeypatch.setattr(trt_target, "export_onnx_file", lambda *args, **kwargs: path)
    with pytest.raises(ValueError, match="target_verify.*mostly fp16"):
        export_plugin_onnx("target_verify", modules["target_verify"], (), profile, path, "fp32")
    assert {i.type.tensor_type.elem_type for i in model.graph.input if i.name == "tokens"} == {onnx.TensorProto.FLOAT}
    types_ = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    for node in plugin_nodes(model):
        assert [types_[i] for i in node.input] == [onnx.TensorProto.FLOAT16] * 3 + [onnx.TensorProto.INT64]
    session = _session(decompose_plugin_nodes(model))
    inputs = _ragged_inputs(tiny_config, layers, 3, 5, 40, 1)
    got = session.run(None, _feed(session, inputs))
    with torch.no_grad():
        ref = references["target_verify"](*inputs)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r.numpy(), atol=2e-2, rtol=2e-2)
