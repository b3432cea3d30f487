"""`scatter_in_place`: the ONNX pass behind the `onnx` target's in-place AR engines (`--kv-update in-place`;
DESIGN.md "Engines"; issue 13 item 1).

Those engines are exported from `in_buffer_engine` (exporter/engine_modules.py): one cache buffer per layer,
k_cache_<l> / v_cache_<l> [R, H, S, Dh], into which each layer scatters its new keys/values at each row's length
before attending over the buffer (keys j <= lengths[r] + i). torch exports that scatter as `ScatterElements`,
whose output is a new tensor. The pass turns each one whose data is a cache input into

    k_cache_out_<l> = TensorScatter(k_cache_<l>, new keys, lengths, axis=2)      (ONNX opset 24)

which writes the K new positions of row r at lengths[r]. Bound by the runtime to the input's own memory (ONNX
Runtime IOBinding, runtime/backend_onnxruntime.py), it finds its output already holding its input and copies only
the new positions (ONNX Runtime's kernel skips the whole-buffer copy when the two are one buffer), and the
layer's attention then reads that buffer. So a call copies no cache at all: no per-layer slice of a stacked
input, no concat of the cache with the new keys. What grows with the capacity S is attention's own work over
the masked buffer.
"""
from __future__ import annotations

from pathlib import Path

IN_PLACE_OPSET = 24                   # TensorScatter


def scatter_in_place(path: str | Path, layers: int, axis: int = 2) -> None:
    """Rewrite the ONNX file at `path` (module docstring); ValueError unless every per-layer cache input
    (2 * layers) feeds exactly one ScatterElements that becomes its TensorScatter. axis: the sequence axis as the
    node states it (2, or -2 for TensorRT's parser, which takes TensorScatter on 4-D caches with axis -2 only)."""
    import onnx
    from onnx import helper, version_converter

    path = Path(path)
    model = onnx.load(str(path))
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < IN_PLACE_OPSET:
        model = version_converter.convert_version(model, IN_PLACE_OPSET)
    graph = model.graph
    caches = {f"{c}_{layer}" for c in ("k_cache", "v_cache") for layer in range(layers)}
    rewritten = set()
    for at, node in enumerate(list(graph.node)):
        if node.op_type != "ScatterElements" or node.input[0] not in caches:
            continue
        data, _indices, updates = node.input
        scatter = helper.make_node("TensorScatter", [data, updates, "lengths"], list(node.output), axis=axis,
                                   name=f"{node.name}_in_place")
        graph.node.remove(node)
        graph.node.insert(at, scatter)
        rewritten.add(data)
    if rewritten != caches:
        raise ValueError(f"{path.name}: expected one ScatterElements per cache buffer ({len(caches)}), found them "
                         f"for {sorted(rewritten)}")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
