"""Graph rewrites that make the `trt` target's ONNX graphs parse and build with TensorRT's ONNX parser.

  static_cache_axis        TensorScatter becomes an IKVCacheUpdateLayer only over a cache with a static sequence
                           axis ("The KV cache tensor must have a static sequence length dimension"): the in-place
                           engines' per-layer buffers k_cache_<l> / v_cache_<l> get their axis 2 fixed to the buffer
                           length the engine is built for.
  sequences_to_slices      torch.chunk exports as SplitToSequence + SequenceAt (the diffusion heads' modulation
                           chunks), which the parser does not take: each SequenceAt of a constant position becomes
                           a Slice (+ Squeeze where the split drops the axis) of the split's input.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def static_cache_axis(model: onnx.ModelProto, cache_layers: int, length: int) -> list[str]:
    """Fix axis 2 of every per-layer cache input (and its aliased output) to `length`; returns the inputs fixed."""
    names = {f"{c}_{layer}" for c in ("k_cache", "v_cache") for layer in range(cache_layers)}
    names |= {f"{c}_out_{layer}" for c in ("k_cache", "v_cache") for layer in range(cache_layers)}
    fixed = []
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name in names:
            dims = value.type.tensor_type.shape.dim
            if len(dims) != 4:
                raise ValueError(f"cache tensor '{value.name}' has rank {len(dims)}, expected [B, H, S, Dh]")
            dims[2].Clear()
            dims[2].dim_value = int(length)
            fixed.append(value.name)
    missing = sorted(n for n in names if n.startswith(("k_cache_", "v_cache_")) and "_out_" not in n
                     and n not in fixed)
    if missing:
        raise ValueError(f"the in-place graph lacks the cache inputs {missing}")
    return fixed


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_int", "value_ints"):
                    values[node.output[0]] = np.array(helper.get_attribute_value(attr), np.int64)
    return values


def _split_bounds(split: np.ndarray | None, position: int, dim: int | None) -> tuple[int, int]:
    """[start, end) of chunk `position` along the axis. split: None (chunks of 1), a scalar (chunks of that size,
    the last may be shorter) or 1-D sizes."""
    if split is None:
        size = 1
        if position < 0:
            if dim is None:
                raise ValueError("SequenceAt with a negative position over a split of unknown length")
            position += dim
        return position, position + 1
    split = np.asarray(split).astype(np.int64)
    if split.ndim == 0:
        size = int(split)
        if position < 0:
            if dim is None:
                raise ValueError("SequenceAt with a negative position over a split of unknown length")
            position += -(-dim // size)
        return position * size, position * size + size      # Slice clamps the last chunk's end
    sizes = [int(s) for s in split]
    if position < 0:
        position += len(sizes)
    if not 0 <= position < len(sizes):
        raise ValueError(f"SequenceAt position {position} is outside a split into {len(sizes)} parts")
    start = sum(sizes[:position])
    return start, start + sizes[position]


def sequences_to_slices(model: onnx.ModelProto) -> int:
    """Rewrite SplitToSequence -> SequenceAt(constant position) pairs to Slice in place; returns the number of
    SequenceAt nodes rewritten. Raises ValueError for a sequence used any other way (the parser would refuse it)."""
    graph = model.graph
    splits = {n.output[0]: n for n in graph.node if n.op_type == "SplitToSequence"}
    if not splits:
        return 0
    consts = _constants(model)
    shapes = {}
    for value in list(graph.value_info) + list(graph.input):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    new_nodes, rewritten, extra_inits = [], 0, []
    for node in graph.node:
        if node.op_type == "SplitToSequence":
            continue
        if node.op_type != "SequenceAt" or node.input[0] not in splits:
            if any(i in splits for i in node.input):
                raise ValueError(f"node '{node.name}' ({node.op_type}) uses a SplitToSequence output: only "
                                 "SequenceAt with a constant position is rewritten to Slice")
            new_nodes.append(node)
            continue
        split_node = splits[node.input[0]]
        attrs = {a.name: helper.get_attribute_value(a) for a in split_node.attribute}
        axis, keepdims = int(attrs.get("axis", 0)), int(attrs.get("keepdims", 1))
        if node.input[1] not in consts:
            raise ValueError(f"SequenceAt '{node.name}' has a position computed at run time; cannot rewrite")
        position = int(np.asarray(consts[node.input[1]]).reshape(-1)[0])
        split = consts.get(split_node.input[1]) if len(split_node.input) > 1 and split_node.input[1] else None
        if len(split_node.input) > 1 and split_node.input[1] and split is None:
            raise ValueError(f"SplitToSequence '{split_node.name}' has split sizes computed at run time")
        source = split_node.input[0]
        rank_dims = shapes.get(source)
        dim = rank_dims[axis] if rank_dims and -len(rank_dims) <= axis < len(rank_dims) else None
        start, end = _split_bounds(split, position, dim)
        prefix = f"{node.name or node.output[0]}_slice"
        params = {"starts": [start], "ends": [end], "axes": [axis]}
        for key, value in params.items():
            extra_inits.append(numpy_helper.from_array(np.array(value, np.int64), f"{prefix}/{key}"))
        squeeze = split is None and not keepdims
        sliced = f"{prefix}/out" if squeeze else node.output[0]
        new_nodes.append(helper.make_node("Slice", [source, f"{prefix}/starts", f"{prefix}/ends", f"{prefix}/axes"],
                                          [sliced], name=prefix))
        if squeeze:
            extra_inits.append(numpy_helper.from_array(np.array([axis], np.int64), f"{prefix}/squeeze_axes"))
            new_nodes.append(helper.make_node("Squeeze", [sliced, f"{prefix}/squeeze_axes"], [node.output[0]],
                                              name=f"{prefix}_squeeze"))
        rewritten += 1
    outputs = {o.name for o in graph.output}
    if outputs & set(splits):
        raise ValueError("a graph output is a sequence; TensorRT takes tensors only")
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(extra_inits)
    return rewritten
