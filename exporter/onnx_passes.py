"""`update_cache_in_place`: the AR engines of the `onnx` target also write their new keys/values into the KV
cache buffer they were given, in place (DESIGN.md "Engines"; issue 13 item 1).

The pass appends to draft_step / target_verify / target_jacobi (dynamic cache axis):

    rows  = Tile(lengths, [L])                        # row l*R + r of the flattened cache starts at lengths[r]
    k_cache_out = TensorScatter(Reshape(k_cache, [L*R, H, S, Dh]), Reshape(new_k, [L*R, H, K, Dh]), rows, axis=2)
    v_cache_out likewise                              (ONNX opset 24: the graph is converted from the export's)

`k_cache_out` is the input buffer with each row's K new positions written at its length. Bound by the runtime to
the same memory as `k_cache` (ONNX Runtime IOBinding, runtime/backend_onnxruntime.py), the scatter finds its
output already holding its input and copies only the new positions (ONNX Runtime's kernel skips the whole-buffer
copy when the two are one buffer); the runtime then leaves its host write out. Reshape of a contiguous input is a
view, so the bound output is the caller's buffer itself. Every other output is unchanged (new_k / new_v still serve
callers that pass a gathered copy of the cache, e.g. a subset of rows or merged serving requests).

Attention still reads the cache through the exported graph's own concat of [cache, new]; attending over the
updated buffer directly would change the model's key order (a new export contract), left for the TensorRT
IKVCacheUpdateLayer path.
"""
from __future__ import annotations

from pathlib import Path

from .engine_modules import CACHE_OUTPUTS

IN_PLACE_OPSET = 24                   # TensorScatter
CACHES = (("k_cache", "new_k"), ("v_cache", "new_v"))
PREFIX = "fastardiff_in_place"


def can_update_in_place(graph) -> bool:
    """An AR engine with per-row lengths, both caches with a dynamic position axis, and new_k / new_v outputs."""
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name for o in graph.output}
    if "lengths" not in inputs or any(c not in inputs or n not in outputs for c, n in CACHES):
        return False
    if outputs & set(CACHE_OUTPUTS):
        return False
    return all(len(d := inputs[c].type.tensor_type.shape.dim) == 5 and d[3].dim_param for c, _ in CACHES)


def update_cache_in_place(path: str | Path) -> bool:
    """Rewrite the ONNX file at `path` (module docstring); returns whether it applied (False: left as it was)."""
    import onnx
    from onnx import TensorProto, helper, version_converter

    path = Path(path)
    model = onnx.load(str(path))
    if not can_update_in_place(model.graph):
        return False
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < IN_PLACE_OPSET:
        model = version_converter.convert_version(model, IN_PLACE_OPSET)
    graph = model.graph
    name = lambda s: f"{PREFIX}_{s}"  # noqa: E731

    def const(key, values):
        return helper.make_node("Constant", [], [name(key)], name=name(key),
                                value=helper.make_tensor(name(key), TensorProto.INT64, [len(values)], values))

    nodes = [const("zero", [0]), const("one", [1]), const("two", [2]), const("end", [1 << 62]), const("all", [-1]),
             helper.make_node("Shape", ["k_cache"], [name("shape")], name=name("shape")),
             helper.make_node("Slice", [name("shape"), name("zero"), name("one")], [name("layers")],
                              name=name("layers")),
             helper.make_node("Tile", ["lengths", name("layers")], [name("rows")], name=name("rows"))]

    def flat(tensor, key):       # [L, R, H, X, Dh] -> [L*R, H, X, Dh] (a view of a contiguous tensor)
        return [helper.make_node("Shape", [tensor], [name(key + "_shape")], name=name(key + "_shape")),
                helper.make_node("Slice", [name(key + "_shape"), name("two"), name("end")], [name(key + "_tail")],
                                 name=name(key + "_tail")),
                helper.make_node("Concat", [name("all"), name(key + "_tail")], [name(key + "_dims")], axis=0,
                                 name=name(key + "_dims")),
                helper.make_node("Reshape", [tensor, name(key + "_dims")], [name(key + "_flat")],
                                 name=name(key + "_flat"))]

    for (cache, new), out in zip(CACHES, CACHE_OUTPUTS):
        nodes += flat(cache, cache) + flat(new, new)
        nodes.append(helper.make_node("TensorScatter", [name(cache + "_flat"), name(new + "_flat"), name("rows")],
                                      [out], axis=2, name=name(out)))
        dtype = next(i for i in graph.input if i.name == cache).type.tensor_type.elem_type
        graph.output.append(helper.make_tensor_value_info(out, dtype, [None] * 4))
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    tmp = path.with_suffix(path.suffix + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return True
