"""A build-time creator for the EntropyAttention plugin, in Python (TensorRT's IPluginV3 Python interface).

The TensorRT builder must create every plugin layer of a graph it parses: it asks the layer for its output types
and shapes and which type/format combinations it takes, then serialises the layer's fields into the engine. None
of that runs the kernel, so it needs neither a GPU nor the C++ plugin library (nor TensorRT's C++ headers to
build it). This creator answers those questions exactly as runtime/plugin/entropy_attention_plugin.cpp does:

  name / version / namespace   EntropyAttention / 1 / fastardiff
  fields                       scale (float32), normalize (int32 0/1), in_buffer (int32 0/1), in that order
  inputs                       q, k, v (fp32, fp16 or bf16, q's type), lengths (int32 or int64), linear format
  outputs                      out [B,H,K,Dh] and entropy [B,H,K], in q's type

so an engine built with it deserialises with the C++ creator (which reads the same serialized fields) and runs
the CUDA kernel there. `enqueue` is never called while building; if a process ever tried to run an engine with
this creator registered it fails with a clear message instead of computing anything.
"""
from __future__ import annotations

import numpy as np

from fastardiff.runtime.backend_tensorrt import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

FIELD_ORDER = ("scale", "normalize", "in_buffer")
FLOAT_TYPES = ("FLOAT", "HALF", "BF16")


def read_fields(fields) -> tuple[float, int, int]:
    """(scale, normalize, in_buffer) from a PluginFieldCollection, with the C++ creator's defaults (0.0, 1, 0) and
    its rules: one value each; scale float32/float64; normalize / in_buffer any integer; in_buffer 0 or 1."""
    values = {"scale": 0.0, "normalize": 1, "in_buffer": 0}
    for field in fields:
        if field.name not in values:
            continue          # other attributes a graph tool adds are ignored, as in C++
        data = np.asarray(field.data).reshape(-1)
        if data.size != 1:
            raise ValueError(f"{PLUGIN_NAME} field '{field.name}' must hold one value, got {data.size}")
        values[field.name] = float(data[0]) if field.name == "scale" else int(data[0])
    if not np.isfinite(values["scale"]):
        raise ValueError(f"{PLUGIN_NAME} field 'scale' is not finite")
    if values["in_buffer"] not in (0, 1):
        raise ValueError(f"{PLUGIN_NAME} field 'in_buffer' must be 0 or 1, got {values['in_buffer']}")
    return values["scale"], int(values["normalize"] != 0), values["in_buffer"]


def serialized_fields(trt, scale: float, normalize: int, in_buffer: int):
    """The PluginFieldCollection the plugin serialises: same names, types and order as getFieldsToSerialize()."""
    kind = trt.PluginFieldType
    return trt.PluginFieldCollection([
        trt.PluginField("scale", np.array([scale], np.float32), kind.FLOAT32),
        trt.PluginField("normalize", np.array([normalize], np.int32), kind.INT32),
        trt.PluginField("in_buffer", np.array([in_buffer], np.int32), kind.INT32),
    ])


def make_creator(trt):
    """An IPluginCreatorV3One instance for `trt` (the tensorrt or tensorrt_rtx module)."""
    float_types = {getattr(trt.DataType, n) for n in FLOAT_TYPES if hasattr(trt.DataType, n)}
    int_types = {trt.DataType.INT32, trt.DataType.INT64}

    class EntropyAttentionBuildPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                                      trt.IPluginV3OneRuntime):
        def __init__(self, scale: float, normalize: int, in_buffer: int):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.scale, self.normalize, self.in_buffer = scale, normalize, in_buffer
            self.plugin_name, self.plugin_version, self.plugin_namespace = PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE
            self.num_outputs = 2

        def get_capability_interface(self, capability):
            return self

        def clone(self):
            return EntropyAttentionBuildPlugin(self.scale, self.normalize, self.in_buffer)

        # build capability
        def configure_plugin(self, inputs, outputs):
            if len(inputs) != 4 or len(outputs) != 2:
                raise ValueError(f"{PLUGIN_NAME} takes (q, k, v, lengths) -> (out, entropy)")
            if inputs[0].desc.dims[3] > 256:   # the kernel's FASTARDIFF_MAX_HEAD_DIM
                raise ValueError(f"{PLUGIN_NAME}: head dim above 256 is not supported by the kernel")

        def get_output_data_types(self, input_types):
            if input_types[0] not in float_types:
                raise ValueError(f"{PLUGIN_NAME}: q must be fp32, fp16 or bf16, got {input_types[0]}")
            return [input_types[0], input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            q = inputs[0]
            entropy = trt.DimsExprs(3)
            for axis in range(3):
                entropy[axis] = q[axis]
            return [trt.DimsExprs(q), entropy]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return desc.type in float_types
            if pos == 3:
                return desc.type in int_types
            return desc.type == in_out[0].desc.type

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        # runtime capability (the builder asks for the fields; nothing here runs the kernel)
        def get_fields_to_serialize(self):
            return serialized_fields(trt, self.scale, self.normalize, self.in_buffer)

        def on_shape_change(self, inputs, outputs):
            pass

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            raise RuntimeError(f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME} build-time creator cannot run the kernel: load "
                               "the C++ plugin library (the engine's embedded one, or FASTARDIFF_TRT_PLUGIN)")

    class EntropyAttentionBuildCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE
            kind = trt.PluginFieldType
            self.field_names = trt.PluginFieldCollection([
                trt.PluginField("scale", np.array([], np.float32), kind.FLOAT32),
                trt.PluginField("normalize", np.array([], np.int32), kind.INT32),
                trt.PluginField("in_buffer", np.array([], np.int32), kind.INT32),
            ])

        def create_plugin(self, name, fields, phase):
            return EntropyAttentionBuildPlugin(*read_fields(fields))

    return EntropyAttentionBuildCreator()


_REGISTERED: dict[int, object] = {}   # id(trt module) -> creator (kept alive: the registry holds a raw pointer)


def register_build_creator(trt) -> bool:
    """Register the Python creator with `trt`'s plugin registry once per process. Returns False when another
    creator of the same name/version/namespace (the C++ library) is already registered: that one builds then."""
    if id(trt) in _REGISTERED:
        return True
    registry = trt.get_plugin_registry()
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None:
        return False
    creator = make_creator(trt)
    if not registry.register_creator(creator, PLUGIN_NAMESPACE):
        raise RuntimeError(f"TensorRT refused to register the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} build-time creator")
    _REGISTERED[id(trt)] = creator
    return True
