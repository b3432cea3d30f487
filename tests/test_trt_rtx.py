"""The `trt` target against the real TensorRT for RTX library, on a machine without a GPU: the small config's engines
(draft_step, target_verify, target_jacobi, draft_rollout_1, decoder: in place, fp32; draft_step with
`--kv-update host` in fp16; the fast-ardiff head_student) exported, parsed and built once for the module, then
checked: engine magic, layer census (plugin and KV-cache-update layers), the builder's progress callbacks, the
rewrites the build needs, compute-capability and validity errors. Deserialising and running need a GPU (none here)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fastardiff.errors import EngineError, FastardiffError

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
pytestmark = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed (pip install 'fastardiff[trt-rtx]')")
ROOT = Path(__file__).resolve().parents[1]
CAPABILITIES = ("8.6",)
IN_PLACE = ("draft_step", "target_verify", "target_jacobi")


def _build_graphs(ckpt, names, opts, work_dir):
    from fastardiff.exporter.engine_modules import shape_profiles
    from fastardiff.exporter.head_engines import HEAD_ENGINES, head_profile
    from fastardiff.exporter.targets import engine_modules
    from fastardiff.exporter.trt_target import TensorRTBuild, build_engine_file, export_engine_graph

    built = TensorRTBuild(opts)
    modules, _ = engine_modules(ckpt, opts)
    profiles = shape_profiles(ckpt.config, opts.max_batch, opts.gamma)
    graphs = {}
    for name in names:
        profile = head_profile(ckpt.config, name, opts.max_batch, opts.gamma) if name in HEAD_ENGINES \
            else profiles[name]
        graph = export_engine_graph(ckpt, name, modules[name], profile, work_dir, opts, built)
        graph.engine_file = build_engine_file(built, ckpt.config.to_dict(), graph, work_dir, opts.precision)
        graphs[name] = graph
    return built, graphs


@pytest.fixture(scope="module")
def rtx_engines(random_checkpoint, tmp_path_factory):
    """(work dir, {variant: (TensorRTBuild, {name: EngineGraph})}) built once for every test of this module."""
    from fastardiff.exporter.targets import ExportOptions, resolve_options
    from fastardiff.recipes.checkpoint import load_checkpoint

    base = tmp_path_factory.mktemp("rtx")
    opts = resolve_options(ExportOptions(target="trt", gamma=1, max_batch=4, trt_library="tensorrt_rtx",
                                         compute_capabilities=CAPABILITIES))
    assert opts.kv_update == "in-place" and opts.trt_library == "tensorrt_rtx"
    variants = {}
    (base / "in-place").mkdir()
    variants["in-place"] = _build_graphs(random_checkpoint, ["draft_step", "target_verify", "target_jacobi",
                                                             "draft_rollout_1", "decoder"], opts, base / "in-place")
    host = resolve_options(ExportOptions(target="trt", gamma=1, max_batch=4, trt_library="tensorrt_rtx",
                                         compute_capabilities=CAPABILITIES, kv_update="host", precision="fp16"))
    (base / "host-fp16").mkdir()
    variants["host-fp16"] = _build_graphs(random_checkpoint, ["draft_step"], host, base / "host-fp16")
    head = load_checkpoint(ROOT / "recipes" / "checkpoints" / "tiny-mnist-fast-ardiff.pt")
    (base / "head").mkdir()
    variants["head"] = _build_graphs(head, ["head_student"], opts, base / "head")
    return base, variants


def test_every_engine_is_a_serialized_tensorrt_rtx_engine(rtx_engines):
    base, variants = rtx_engines
    for variant, (built, graphs) in variants.items():
        assert built.library.key == "tensorrt_rtx" and built.capabilities == CAPABILITIES
        for name, graph in graphs.items():
            data = (base / variant / graph.engine_file).read_bytes()
            stats = built.stats[name]
            assert data[:4] == b"vtrt", (variant, name)             # TensorRT's serialized-engine magic
            assert stats["bytes"] == len(data) > 100_000
            assert stats["progress_callbacks"] > 0                  # the builder reported its phases to our monitor
            assert stats["seconds"] > 0 and stats["layers"] > 10
            assert not list((base / variant).glob("*.tmp"))          # written atomically


def test_plugin_and_kv_cache_update_layers(rtx_engines, random_checkpoint):
    """The parsed networks hold one PLUGIN_V3 layer per entropy-attention node and, in place, one
    KV_CACHE_UPDATE layer per cache tensor (2 per layer); the host form and the decoder none."""
    _, variants = rtx_engines
    built, graphs = variants["in-place"]
    for name, graph in graphs.items():
        stats = built.stats[name]
        assert stats["plugin_layers"] == graph.plugin_nodes, name
        assert stats["kv_cache_update_layers"] == (2 * graph.cache_layers if name in IN_PLACE else 0), name
    assert graphs["draft_step"].cache_layers == random_checkpoint.draft.num_layers
    assert built.stats["target_verify"]["plugin_layers"] >= 1 and built.stats["draft_rollout_1"]["plugin_layers"] >= 1
    assert built.stats["decoder"]["plugin_layers"] == 0
    host_built, host_graphs = variants["host-fp16"]
    assert host_built.stats["draft_step"]["kv_cache_update_layers"] == 0
    assert host_built.stats["draft_step"]["plugin_layers"] == host_graphs["draft_step"].plugin_nodes >= 1
    head_built, _ = variants["head"]
    assert head_built.stats["head_student"]["plugin_layers"] == 0 and head_built.stats["head_student"]["layers"] > 0


def test_in_place_cache_axis_is_static_and_needed(rtx_engines, tiny_config):
    """The in-place graphs are built with the cache axis fixed at the profile's length; the same graph with the
    axis dynamic again does not build (TensorRT-RTX's KV-cache-update layer refuses it)."""
    import dataclasses

    import tensorrt_rtx as trt

    from fastardiff.exporter.trt_build import build_engine
    from fastardiff.exporter.trt_target import profile_shapes

    base, variants = rtx_engines
    built, graphs = variants["in-place"]
    graph = graphs["draft_step"]
    lo, opt, hi = graph.build_profile.cache
    assert lo == opt == hi == graph.build_profile.new_tokens[2] + graph.profile.cache[2]
    model = onnx.load(str(base / "in-place" / graph.onnx_file))
    cache_inputs = [i for i in model.graph.input if i.name.startswith("k_cache_")]
    assert [i.type.tensor_type.shape.dim[2].dim_value for i in cache_inputs] == [hi] * graph.cache_layers
    for value in cache_inputs:
        value.type.tensor_type.shape.dim[2].Clear()
        value.type.tensor_type.shape.dim[2].dim_param = "cache"
    dynamic = base / "dynamic.onnx"
    onnx.save(model, str(dynamic))
    shapes = profile_shapes(tiny_config.to_dict(), "draft_step", graph.layers,
                            dataclasses.replace(graph.build_profile, cache=(1, 8, hi)), graph.cache_layers)
    with pytest.raises(FastardiffError, match="failed to build 'dynamic'|could not parse"):
        build_engine(trt, built.logger, dynamic, base / "dynamic.engine", shapes, "fp32", None, "dynamic",
                     built.library, CAPABILITIES)
    assert not (base / "dynamic.engine").exists()


def test_unversioned_library_link_is_made_by_the_project():
    from fastardiff.runtime.trt_library import TRT_LIBRARIES, ensure_unversioned_links

    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    libs = Path(list(spec.submodule_search_locations)[0])
    ensure_unversioned_links(TRT_LIBRARIES["tensorrt_rtx"])
    link = libs / "libtensorrt_rtx.so"
    assert link.exists() and link.resolve() == (libs / "libtensorrt_rtx.so.1").resolve()


def _split_model(split, keepdims=1):
    """x [2, 12, 3] -> SplitToSequence along axis 1 -> SequenceAt 0, 1 and -1 (what torch.chunk exports)."""
    inits, inputs = [], ["x"]
    if split is not None:
        inits.append(helper.make_tensor("split", TensorProto.INT64, np.shape(split), np.ravel(split).tolist()))
        inputs.append("split")
    nodes = [helper.make_node("SplitToSequence", inputs, ["seq"], axis=1, keepdims=keepdims)]
    for i, pos in enumerate((0, 1, -1)):
        inits.append(helper.make_tensor(f"p{i}", TensorProto.INT64, [], [pos]))
        nodes.append(helper.make_node("SequenceAt", ["seq", f"p{i}"], [f"y{i}"]))
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 12, 3])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(3)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("split,keepdims", [(np.array(5), 1), ([3, 4, 5], 1), (None, 0), (None, 1)])
def test_sequences_become_slices_with_the_same_values(split, keepdims):
    import onnxruntime as ort

    from fastardiff.exporter.trt_onnx_fixes import sequences_to_slices

    model = _split_model(split, keepdims)
    x = np.random.default_rng(0).standard_normal((2, 12, 3)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert sequences_to_slices(model) == 3
    assert not [n for n in model.graph.node if n.op_type in ("SplitToSequence", "SequenceAt")]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_compute_capability_option_and_cache_key():
    from fastardiff.exporter.export import cache_key
    from fastardiff.exporter.targets import ExportOptions, resolve_options
    from fastardiff.runtime.trt_library import DEFAULT_COMPUTE_CAPABILITIES, parse_compute_capabilities

    assert parse_compute_capabilities("") == DEFAULT_COMPUTE_CAPABILITIES
    assert parse_compute_capabilities("8.9, 8.6,8.9") == ("8.9", "8.6")
    with pytest.raises(FastardiffError, match="--compute-capability 9.0: TensorRT-RTX builds for .*8.6"):
        parse_compute_capabilities("9.0")
    a = resolve_options(ExportOptions(target="trt", trt_library="tensorrt_rtx"))
    b = resolve_options(ExportOptions(target="trt", trt_library="tensorrt_rtx", compute_capabilities=("8.6",)))
    assert a.compute_capabilities == DEFAULT_COMPUTE_CAPABILITIES and b.compute_capabilities == ("8.6",)
    key = lambda o: cache_key("c", "h", {}, o, {"tensorrt_rtx_cu12": "1.7.1.116"})  # noqa: E731
    assert key(a) != key(b)


def test_cli_refuses_an_unknown_compute_capability(random_checkpoint_path, tmp_path, capsys):
    from fastardiff.cli import main

    out = tmp_path / "engines"
    with pytest.raises(SystemExit) as exc:
        main(["export", "--target", "trt", "--ckpt", str(random_checkpoint_path), "--out", str(out),
              "--compute-capability", "7.0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--compute-capability 7.0" in err and not out.exists()


def test_validity_and_compute_capability_errors_name_the_gpu_and_the_fix(rtx_engines):
    """Without a GPU, TensorRT-RTX's get_engine_validity calls a real engine INVALID: the backend's check turns
    that into one line; a GPU outside the built compute capabilities is refused before deserialising."""
    import tensorrt_rtx as trt

    from types import SimpleNamespace

    from fastardiff.runtime.trt_rtx_runtime import check_compute_capability, check_engine_validity

    base, variants = rtx_engines
    built, graphs = variants["in-place"]
    path = base / "in-place" / graphs["draft_step"].engine_file
    runtime = trt.Runtime(built.logger)
    gpu = {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    with pytest.raises(EngineError, match="TensorRT-RTX cannot use engine .*draft_step.engine.* on NVIDIA GeForce "
                                          "RTX 4090 \\(8.9\\)"):
        check_engine_validity(trt, runtime, path.read_bytes(), path, gpu)
    manifest = SimpleNamespace(export={"trt": {"library": "tensorrt_rtx", "compute_capabilities": ["8.6"]}})
    with pytest.raises(EngineError, match="built for compute capabilities 8.6; this GPU is NVIDIA GeForce RTX 4090 "
                                          "\\(8.9\\): rebuild with .*--compute-capability 8.9 --force"):
        check_compute_capability(manifest, gpu, base)
    with pytest.raises(EngineError, match="H100.*does not build for it.*--trt-library tensorrt"):
        check_compute_capability(manifest, {"name": "NVIDIA H100", "compute_capability": "9.0"}, base)
    check_compute_capability(manifest, {"name": "NVIDIA RTX A6000", "compute_capability": "8.6"}, base)


CREATOR_SCRIPT = r"""
import sys
from pathlib import Path
import onnx
from onnx import TensorProto, helper
from fastardiff.exporter import trt_graph
from fastardiff.exporter.trt_build import build_engine
from fastardiff.runtime import trt_library

creator, plugin, jobs = sys.argv[1], sys.argv[2], sys.argv[3:]
library = trt_library.TRT_LIBRARIES["tensorrt_rtx"]
trt = trt_library.import_library(library, "test")
if creator == "cpp":
    trt.get_plugin_registry().load_library(plugin)
else:
    from fastardiff.exporter.trt_plugin_creator import register_build_creator
    assert register_build_creator(trt)
trt_graph.register_onnx_schema()
f = TensorProto.FLOAT
for job in jobs:                       # scale:embed(0/1):engine path
    scale, embed, out = job.split(":", 2)
    out = Path(out)
    node = helper.make_node("EntropyAttention", ["q", "k", "v", "lengths"], ["out", "entropy"], domain="fastardiff",
                            scale=float(scale), normalize=1, in_buffer=1, plugin_namespace="fastardiff",
                            plugin_version="1")
    io = [helper.make_tensor_value_info(n, f, [2, 4, 3 if n == "q" else 8, 16]) for n in "qkv"]
    io.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, [2]))
    graph = helper.make_graph([node], "one", io, [helper.make_tensor_value_info("out", f, [2, 4, 3, 16]),
                                                  helper.make_tensor_value_info("entropy", f, [2, 4, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("fastardiff", 1)])
    onnx.save(model, str(out.with_suffix(".onnx")))
    build_engine(trt, trt.Logger(trt.Logger.ERROR), out.with_suffix(".onnx"), out, {}, "fp32", None, out.stem,
                 library, ("8.6",), Path(plugin) if embed == "1" else None)
"""


def _creator_engines(tmp_path, creator, jobs, plugin=""):
    """Build one-node engines in a fresh process (one creator per registry): jobs = [(scale, embed)] -> bytes."""
    outs = [tmp_path / f"{creator}-{i}.engine" for i in range(len(jobs))]
    args = [f"{scale}:{int(embed)}:{out}" for (scale, embed), out in zip(jobs, outs)]
    proc = subprocess.run([sys.executable, "-c", CREATOR_SCRIPT, creator, plugin, *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [out.read_bytes() for out in outs]


PLUGIN = ROOT / "build" / "plugin" / "libfastardiff_trt_plugin.so"


def test_python_creator_serializes_what_its_fields_say(tmp_path):
    """One plugin node built with the Python build-time creator: its scale is in the engine (another scale,
    another engine), and the same scale gives the same bytes (deterministic, so the C++ comparison can hold);
    where the C++ library is built, embedding it (plugins_to_serialize) puts it in the engine."""
    embed = PLUGIN.is_file()
    first, again, other, *embedded = _creator_engines(
        tmp_path, "py", [(0.25, False), (0.25, False), (0.5, False)] + [(0.25, True)] * embed, str(PLUGIN))
    assert first[:4] == b"vtrt" and again == first and other != first
    if embed:
        assert embedded[0][:4] == b"vtrt" and len(embedded[0]) > len(first) + PLUGIN.stat().st_size // 2


@pytest.mark.skipif(not PLUGIN.is_file(), reason="C++ plugin not built (cmake with TensorRT headers: docs/tensorrt.md)")
def test_cpp_and_python_creators_serialize_the_same_fields(tmp_path):
    """The same one-node graph built with the C++ creator (libfastardiff_trt_plugin.so) and with the Python one
    gives byte-identical engines: same name, version, namespace and serialized fields."""
    (python,) = _creator_engines(tmp_path, "py", [(0.25, False)])
    cpp, cpp_other = _creator_engines(tmp_path, "cpp", [(0.25, False), (0.5, False)], str(PLUGIN))
    assert cpp == python and cpp_other != python


def test_fp16_builds_keep_the_cache_update_on_the_host(tiny_config):
    """An fp16 graph casts the runtime's fp32 caches, so its KV-cache-update layers would write the cast copy:
    `auto` picks host there, and in-place is refused with one line."""
    import dataclasses

    from fastardiff.exporter.targets import ExportOptions, check_options, resolve_options

    opts = resolve_options(ExportOptions(target="trt", precision="fp16", trt_library="tensorrt_rtx"))
    assert opts.kv_update == "host"
    assert resolve_options(ExportOptions(target="trt", trt_library="tensorrt_rtx")).kv_update == "in-place"
    with pytest.raises(FastardiffError, match="in-place with --precision fp16 is not built for --target trt"):
        check_options(tiny_config, dataclasses.replace(opts, kv_update="in-place"))
