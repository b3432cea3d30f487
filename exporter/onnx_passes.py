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


def at_least_opset(model, version: int):
    """`model` converted to ONNX opset `version` when its default-domain opset is older (else as it is)."""
    from onnx import version_converter

    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < version:
        return version_converter.convert_version(model, version)
    return model


def scatter_in_place(path: str | Path, layers: int, axis: int = 2) -> None:
    """Rewrite the ONNX file at `path` (module docstring); ValueError unless every per-layer cache input
    (2 * layers) feeds exactly one ScatterElements that becomes its TensorScatter. axis: the sequence axis as the
    node states it (2, or -2 for TensorRT's parser, which takes TensorScatter on 4-D caches with axis -2 only)."""
    import onnx
    from onnx import helper

    path = Path(path)
    model = onnx.load(str(path))
    model = at_least_opset(model, IN_PLACE_OPSET)
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


GELU_OPSET = 20                       # Gelu


def fuse_gelu(path: str | Path) -> int:
    """Rewrite each exact GELU that torch.onnx exports as five nodes, x * (0.5 * (1 + erf(x / sqrt 2))) (Div, Erf,
    Add, Mul, Mul), into one ONNX `Gelu` (opset 20), which ONNX Runtime then fuses with the preceding bias Add into
    one BiasGelu: 6 nodes -> 1 per MLP, on a CPU where a small graph's call costs ~1 us per node (12-layer target,
    batch 1: a 1-token call ~8 % faster, 17 tokens ~10 %). Only chains whose constants are sqrt 2, 1 and 0.5 are
    rewritten, so the values are the same function; the export's parity check runs on the rewritten file.
    Returns the number of GELUs fused (0: the file is left as it was)."""
    import math

    import onnx
    from onnx import helper, numpy_helper

    path = Path(path)
    model = onnx.load(str(path))
    model = at_least_opset(model, GELU_OPSET)
    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def scalar(name: str, value: float) -> bool:
        v = constants.get(name)
        return v is not None and v.size == 1 and math.isclose(float(v.reshape(-1)[0]), value, rel_tol=1e-6)

    def only_consumer(name: str, op: str):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def other(node, name: str) -> str | None:
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else None

    fused, drop = {}, set()
    for erf in graph.node:
        div = producer.get(erf.input[0]) if erf.op_type == "Erf" else None
        if div is None or div.op_type != "Div" or not scalar(div.input[1], math.sqrt(2.0)):
            continue
        x = div.input[0]
        add = only_consumer(erf.output[0], "Add")
        half = add and scalar(other(add, erf.output[0]) or "", 1.0) and only_consumer(add.output[0], "Mul")
        out = half and scalar(other(half, add.output[0]) or "", 0.5) and only_consumer(half.output[0], "Mul")
        if not out or other(out, half.output[0]) != x or len(consumers.get(div.output[0], [])) != 1:
            continue
        fused[id(out)] = helper.make_node("Gelu", [x], list(out.output), name=f"{out.name}_gelu")
        drop.update(id(n) for n in (div, erf, add, half))
    if not fused:
        return 0
    nodes = [fused.get(id(n), n) for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return len(fused)
