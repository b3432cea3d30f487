"""TensorRT graph pass: the entropy-attention layers become TensorRT plugin nodes in the exported ONNX graph.

How the custom node gets into the graph:
  1. `fastardiff::entropy_attention_plugin` is a torch custom op (CPU implementation = the reference, fake
     implementation for tracing); it is registered as ENTROPY_ATTENTION_IMPLS["plugin"], and the TensorRT target
     switches the AR models' entropy layers to it (`use_plugin_attention`). Layers whose entropy is unused keep
     the native attention and export as standard ops.
  2. The ONNX exporter translates that op with `CUSTOM_TRANSLATION_TABLE` into one node
     `fastardiff::EntropyAttention(q, k, v, lengths) -> (out, entropy)` with attributes scale and normalize.
  3. `mark_plugin_nodes` (the graph pass) stamps what the TensorRT ONNX parser needs to find the plugin creator:
     op_type "EntropyAttention", plugin_namespace "fastardiff", plugin_version "1", and checks the attributes the
     creator reads (scale float32, normalize int). `check_plugin_graph` verifies every other node is a standard op.

The cache length (causal_offset) is not an attribute: the plugin reads it from the input shapes (T - K), the
same value the models pass (keys = [cache, new tokens]). The in-place engines (`--kv-update in-place`) set the
attribute in_buffer = 1 instead: keys are the layer's cache buffer, already holding the new tokens at each row's
length, and row b's query i sees keys j <= lengths[b] + i.

`decompose_plugin_nodes` swaps each plugin node back to the reference's decomposition in standard ONNX ops, so
the plugin-bearing graph can be run by ONNX Runtime and compared with the `onnx` engines (export-time parity of
`--onnx-only` and tests).
"""
from __future__ import annotations

import onnx
import torch
from onnx import TensorProto, helper

from fastardiff.recipes.entropy_attention import ENTROPY_ATTENTION_IMPLS, entropy_attention_reference

PLUGIN_OP = "EntropyAttention"
PLUGIN_DOMAIN = "fastardiff"
PLUGIN_NAMESPACE = "fastardiff"
PLUGIN_VERSION = "1"
PLUGIN_INPUTS = ("q", "k", "v", "lengths")
PLUGIN_OUTPUTS = ("out", "entropy")


# ---------------------------------------------------------------------------------------------- torch op

@torch.library.custom_op("fastardiff::entropy_attention_plugin", mutates_args=())
def entropy_attention_plugin_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                                scale: float, normalize: bool, in_buffer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The plugin's semantics in PyTorch: keys [cache, new tokens] (causal_offset = T - K, as the plugin derives it
    from the shapes), or in_buffer: keys are a cache buffer holding the new tokens at each row's length (row b's
    query i sees keys j <= lengths[b] + i; the in-place engines, models.py in_buffer)."""
    offset = None if in_buffer else k.shape[-2] - q.shape[-2]
    return entropy_attention_reference(q, k, v, lengths, offset, scale, normalize)


@entropy_attention_plugin_op.register_fake
def _plugin_fake(q, k, v, lengths, scale, normalize, in_buffer):
    return torch.empty_like(q), q.new_empty(q.shape[:-1])


def entropy_attention_plugin(q, k, v, lengths, causal_offset, scale: float, normalize: bool = True):
    """ENTROPY_ATTENTION_IMPLS["plugin"]: same signature as the reference; the offset must be T - K, or None for
    keys in a cache buffer (the in-place engines)."""
    if isinstance(causal_offset, int) and causal_offset != k.shape[-2] - q.shape[-2]:
        raise ValueError(f"the TensorRT plugin derives causal_offset = T - K = {k.shape[-2] - q.shape[-2]} from the "
                         f"shapes, got {causal_offset}: keys must be [cache, new tokens] or a cache buffer (None)")
    return torch.ops.fastardiff.entropy_attention_plugin(q, k, v, lengths, float(scale), bool(normalize),
                                                         causal_offset is None)


ENTROPY_ATTENTION_IMPLS["plugin"] = entropy_attention_plugin


def use_plugin_attention(module: torch.nn.Module) -> int:
    """Switch every AR transformer inside `module` to the plugin op; returns how many were switched."""
    from fastardiff.recipes.models import ARTransformer

    switched = 0
    for m in module.modules():
        if isinstance(m, ARTransformer):
            m.attention_impl = "plugin"
            switched += 1
    return switched


def expected_plugin_nodes(module: torch.nn.Module) -> int:
    """Entropy layers per AR model call: the entropy layer and the shallow layer (one node when they coincide; the
    entropy layer only in an engine that computes no shallow entropy, `shallow_entropy = False`),
    times the number of times the engine calls the model (a draft_rollout of length g calls it g times)."""
    from fastardiff.recipes.models import ARTransformer

    # (an int: a library's own modules may have a `gamma` of their own, x-transformers' LayerNorm gain a tensor)
    calls = max((g for m in module.modules() if isinstance(g := getattr(m, "gamma", 0), int)), default=0) or 1
    shallow = all(getattr(m, "shallow_entropy", True) for m in module.modules())   # False: the target engines
    return calls * sum(len(m.entropy_layers(shallow)) for m in module.modules() if isinstance(m, ARTransformer))


# ---------------------------------------------------------------------------------------------- ONNX op

def register_onnx_schema() -> None:
    """Declare fastardiff::EntropyAttention to onnx (so onnxscript can emit it and onnx.checker can check it)."""
    defs = onnx.defs
    if defs.has(PLUGIN_OP, PLUGIN_DOMAIN):
        return
    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    kind = defs.OpSchema.AttrType
    schema = defs.OpSchema(
        PLUGIN_OP, PLUGIN_DOMAIN, 1,
        doc="Fused entropy attention (TensorRT plugin fastardiff::EntropyAttention v1), "
            "semantics in recipes/entropy_attention.py",
        inputs=[param("q", "T"), param("k", "T"), param("v", "T"), param("lengths", "I")],
        outputs=[param("out", "T"), param("entropy", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "q/k/v/outputs"),
                          ("I", ["tensor(int32)", "tensor(int64)"], "lengths")],
        attributes=[attr("scale", kind.FLOAT, "score scale"), attr("normalize", kind.INT, "divide by log n_i"),
                    attr("in_buffer", kind.INT, "keys are a cache buffer: row b's query i sees j <= lengths[b] + i",
                         required=False),
                    attr("plugin_namespace", kind.STRING, "TensorRT plugin namespace", required=False),
                    attr("plugin_version", kind.STRING, "TensorRT plugin version", required=False)])
    defs.register_schema(schema)


def _translate_plugin(q, k, v, lengths, scale: float, normalize: bool, in_buffer: bool):
    import onnxscript

    register_onnx_schema()
    opset = onnxscript.values.Opset(PLUGIN_DOMAIN, 1)
    return opset.EntropyAttention(q, k, v, lengths, scale=float(scale), normalize=int(bool(normalize)),
                                  in_buffer=int(bool(in_buffer)))


def custom_translation_table() -> dict:
    register_onnx_schema()
    return {torch.ops.fastardiff.entropy_attention_plugin.default: _translate_plugin}


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == PLUGIN_OP and n.domain == PLUGIN_DOMAIN]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def mark_plugin_nodes(model: onnx.ModelProto, expected: int | None = None) -> int:
    """The graph pass: give every entropy-attention node what the TensorRT parser and the plugin creator read.
    Returns the number of plugin nodes; raises ValueError when the graph is not what the plugin can take."""
    nodes = plugin_nodes(model)
    if expected is not None and len(nodes) != expected:
        raise ValueError(f"expected {expected} entropy-attention plugin nodes in the exported graph, "
                         f"found {len(nodes)}")
    for idx, node in enumerate(nodes):
        attrs = _attrs(node)
        if len(node.input) != 4 or len(node.output) != 2:
            raise ValueError(f"plugin node '{node.name}' has {len(node.input)} inputs / {len(node.output)} outputs, "
                             "the plugin takes (q, k, v, lengths) -> (out, entropy)")
        if "scale" not in attrs or "normalize" not in attrs:
            raise ValueError(f"plugin node '{node.name}' lacks the scale / normalize attributes the creator reads")
        node.name = node.name or f"entropy_attention_{idx}"
        _set_attr(node, "scale", float(attrs["scale"]))          # FLOAT attribute -> PluginField kFLOAT32
        _set_attr(node, "normalize", int(bool(attrs["normalize"])))  # INT attribute -> PluginField integer
        _set_attr(node, "in_buffer", int(bool(attrs.get("in_buffer", 0))))
        _set_attr(node, "plugin_namespace", PLUGIN_NAMESPACE)
        _set_attr(node, "plugin_version", PLUGIN_VERSION)
    if nodes and not any(o.domain == PLUGIN_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    return len(nodes)


def check_plugin_graph(model: onnx.ModelProto) -> None:
    """Every node outside the plugin nodes is a standard ONNX op (default domain), and no local functions remain."""
    is_plugin = lambda n: n.domain == PLUGIN_DOMAIN and n.op_type == PLUGIN_OP  # noqa: E731
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                      if n.domain not in ("", "ai.onnx") and not is_plugin(n)})
    if foreign:
        raise ValueError(f"the TensorRT graph has non-standard ops besides the plugin: {foreign}")
    if len(model.functions):
        raise ValueError(f"the TensorRT graph still has local functions {[f.name for f in model.functions]}")


# ---------------------------------------------------------------------------------------------- precision

WEIGHT_TYPES = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}


def weight_precisions(model: onnx.ModelProto) -> dict[str, int]:
    """Elements of the graph's floating-point initializers (its weights), per precision name."""
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_type in WEIGHT_TYPES:
            n = 1
            for d in init.dims:
                n *= d
            counts[WEIGHT_TYPES[init.data_type]] = counts.get(WEIGHT_TYPES[init.data_type], 0) + n
    return counts


def check_graph_precision(model: onnx.ModelProto, precision: str, label: str) -> None:
    """A strongly typed TensorRT network computes in the graph's own types, so the graph must be typed in the
    precision asked for: most weight elements in that type (a few fp32 constants, e.g. in LayerNorm, may stay)."""
    counts = weight_precisions(model)
    if not counts:
        return  # no float weights: nothing decides the precision
    dominant = max(counts, key=counts.get)
    if dominant != precision:
        raise ValueError(f"engine '{label}': the exported ONNX graph's weights are mostly {dominant} "
                         f"({counts[dominant]} of {sum(counts.values())} elements), not {precision}; a strongly "
                         f"typed TensorRT build would run it in {dominant}: export the modules cast to {precision} "
                         "(targets.engine_modules with --precision)")


# ---------------------------------------------------------------------------------------------- swap back

def _decomposition(node: onnx.NodeProto, prefix: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Standard-op nodes computing entropy_attention_reference for one plugin node (same output names)."""
    q, k, v, lengths = node.input
    out, entropy = node.output
    attrs = _attrs(node)
    scale, normalize = float(attrs["scale"]), bool(attrs.get("normalize", 1))
    in_buffer = bool(attrs.get("in_buffer", 0))
    t = lambda name: f"{prefix}/{name}"  # noqa: E731
    consts = {
        "scale": helper.make_tensor(t("scale"), TensorProto.FLOAT, [], [scale]),
        "neg_inf": helper.make_tensor(t("neg_inf"), TensorProto.FLOAT, [], [float("-inf")]),
        "zero_f": helper.make_tensor(t("zero_f"), TensorProto.FLOAT, [], [0.0]),
        "one_f": helper.make_tensor(t("one_f"), TensorProto.FLOAT, [], [1.0]),
        "eps": helper.make_tensor(t("eps"), TensorProto.FLOAT, [], [1e-6]),
        "zero": helper.make_tensor(t("zero"), TensorProto.INT64, [], [0]),
        "one": helper.make_tensor(t("one"), TensorProto.INT64, [], [1]),
        "two": helper.make_tensor(t("two"), TensorProto.INT64, [], [2]),
        "axis_last": helper.make_tensor(t("axis_last"), TensorProto.INT64, [1], [-1]),
        "axis_1": helper.make_tensor(t("axis_1"), TensorProto.INT64, [1], [1]),
        "shape_b111": helper.make_tensor(t("shape_b111"), TensorProto.INT64, [4], [-1, 1, 1, 1]),
        "shape_b11": helper.make_tensor(t("shape_b11"), TensorProto.INT64, [3], [-1, 1, 1]),
    }
    c = {name: tensor.name for name, tensor in consts.items()}
    mk = helper.make_node
    nodes = [
        mk("Cast", [q], [t("qf")], to=TensorProto.FLOAT),
        mk("Cast", [k], [t("kf")], to=TensorProto.FLOAT),
        mk("Cast", [v], [t("vf")], to=TensorProto.FLOAT),
        mk("Cast", [lengths], [t("len")], to=TensorProto.INT64),
        mk("Transpose", [t("kf")], [t("kt")], perm=[0, 1, 3, 2]),
        mk("MatMul", [t("qf"), t("kt")], [t("qk")]),
        mk("Mul", [t("qk"), c["scale"]], [t("s")]),
        # causal_offset = T - K from the shapes; rows i in [0, K), keys j in [0, T)
        mk("Shape", [q], [t("q_shape")]), mk("Shape", [k], [t("k_shape")]),
        mk("Gather", [t("q_shape"), c["two"]], [t("K")], axis=0),
        mk("Gather", [t("k_shape"), c["two"]], [t("T")], axis=0),
        mk("Sub", [t("T"), t("K")], [t("offset")]),
        mk("Range", [c["zero"], t("T"), c["one"]], [t("j")]),
        mk("Range", [c["zero"], t("K"), c["one"]], [t("i")]),
        mk("Unsqueeze", [t("i"), c["axis_1"]], [t("i_col")]),
        mk("Reshape", [t("len"), c["shape_b111"]], [t("len4")]),
    ]
    nodes += _buffer_mask(t, c) if in_buffer else _prefix_mask(t)
    nodes += [
        mk("Where", [t("mask"), t("s"), c["neg_inf"]], [t("s_masked")]),
        mk("ReduceLogSumExp", [t("s_masked"), c["axis_last"]], [t("lse")], keepdims=1),
        mk("Sub", [t("s_masked"), t("lse")], [t("log_p")]),
        mk("Exp", [t("log_p")], [t("p")]),
        mk("MatMul", [t("p"), t("vf")], [t("out_f")]),
        mk("CastLike", [t("out_f"), q], [out]),
        mk("Where", [t("mask"), t("s"), c["zero_f"]], [t("s_zeroed")]),  # keeps 0 * -inf out of the sum
        mk("Mul", [t("p"), t("s_zeroed")], [t("ps")]),
        mk("ReduceSum", [t("ps"), c["axis_last"]], [t("sum_ps")], keepdims=0),
        mk("Squeeze", [t("lse"), c["axis_last"]], [t("lse_row")]),
        mk("Sub", [t("lse_row"), t("sum_ps")], [t("h")]),
    ]
    final = t("h")
    if normalize:
        nodes += [
            mk("Reshape", [t("len"), c["shape_b11"]], [t("len3")]),
            mk("Add", [t("len3"), t("i")], [t("len_i")]),
            mk("Add", [t("len_i"), c["one"]], [t("n")]),                 # n_i = lengths[b] + i + 1
            mk("Cast", [t("n")], [t("n_f")], to=TensorProto.FLOAT),
            mk("Log", [t("n_f")], [t("log_n")]),
            mk("Max", [t("log_n"), c["eps"]], [t("log_n_safe")]),
            mk("Div", [t("h"), t("log_n_safe")], [t("h_norm")]),
            mk("Greater", [t("n_f"), c["one_f"]], [t("n_gt1")]),
            mk("Where", [t("n_gt1"), t("h_norm"), c["zero_f"]], [t("h_final")]),
        ]
        final = t("h_final")
    nodes.append(mk("CastLike", [final, q], [entropy]))
    return nodes, list(consts.values())


def _buffer_mask(t, c) -> list[onnx.NodeProto]:
    """in_buffer: row b's query i sees keys j <= clamp(lengths[b], 0, T - K) + i (the kernel's per-row offset)."""
    mk = helper.make_node
    return [mk("Min", [t("len4"), t("offset")], [t("len_hi")]),
            mk("Max", [t("len_hi"), c["zero"]], [t("len_clamped")]),
            mk("Add", [t("len_clamped"), t("i_col")], [t("last_key")]),     # [B,1,K,1]
            mk("LessOrEqual", [t("j"), t("last_key")], [t("mask")])]        # [B,1,K,T]


def _prefix_mask(t) -> list[onnx.NodeProto]:
    """keys [cache, new tokens]: cache keys j < lengths[b], new keys j - (T - K) <= i."""
    mk = helper.make_node
    return [mk("Less", [t("j"), t("len4")], [t("cached")]),              # j < lengths[b]      [B,1,1,T]
            mk("Less", [t("j"), t("offset")], [t("in_cache")]),          # j < causal_offset   [T]
            mk("And", [t("cached"), t("in_cache")], [t("cache_vis")]),
            mk("Not", [t("in_cache")], [t("in_new")]),
            mk("Sub", [t("j"), t("offset")], [t("j_rel")]),
            mk("LessOrEqual", [t("j_rel"), t("i_col")], [t("causal")]),  # j - offset <= i     [K,T]
            mk("And", [t("in_new"), t("causal")], [t("new_vis")]),
            mk("Or", [t("cache_vis"), t("new_vis")], [t("mask")])]       # [B,1,K,T]


def decompose_plugin_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every EntropyAttention plugin node replaced by the reference's standard-op form."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    new_nodes = []
    for idx, node in enumerate(graph.node):
        if node.op_type == PLUGIN_OP and node.domain == PLUGIN_DOMAIN:
            nodes, consts = _decomposition(node, f"{node.name or 'entropy_attention'}_{idx}_ref")
            new_nodes.extend(nodes)
            graph.initializer.extend(consts)
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [o for o in result.opset_import if o.domain != PLUGIN_DOMAIN]
    del result.opset_import[:]
    result.opset_import.extend(kept)
    return result
