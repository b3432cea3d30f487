"""ONNX Runtime's TensorRT-RTX execution provider for `onnx` engines on an RTX GPU (`--device cuda`).

NVIDIA ships it as a plugin EP (`pip install onnxruntime-ep-nv-tensorrt-rtx-cu12`, or the -cu13 default): a shared
library that bundles TensorRT-RTX, registered with ONNX Runtime at run time
(ort.register_execution_provider_library) and attached to a session for the devices it finds
(SessionOptions.add_provider_for_devices), not named in `providers=[...]`. The onnxruntime backend uses it for
`--device cuda` when this onnxruntime has no CUDA/TensorRT provider of its own and the plugin is installed; without
an RTX GPU the plugin finds no device and the backend says so in one line.
"""
from __future__ import annotations

import importlib
import importlib.util

from fastardiff.errors import EngineError

EP_MODULE = "onnxruntime_ep_nv_tensorrt_rtx"
EP_PROVIDER = "NvTensorRTRTXExecutionProvider"     # the provider list entry the backend's device choice carries
_registered: set[str] = set()


def installed() -> bool:
    return importlib.util.find_spec(EP_MODULE) is not None


def ep_devices(ort, device_id: int = 0) -> list:
    """Register the plugin library once per process and return the EP's device `device_id` (a one-item list);
    EngineError naming the fix when it finds no GPU."""
    module = importlib.import_module(EP_MODULE)
    name = module.get_ep_name()
    if name not in _registered:
        try:
            ort.register_execution_provider_library(name, module.get_library_path())
        except Exception as err:   # onnxruntime raises its own types; an old onnxruntime lacks the function
            raise EngineError(f"--device cuda: onnxruntime could not register the TensorRT-RTX execution provider "
                              f"({str(err).splitlines()[0][:160]}); it needs onnxruntime >= 1.24 and an NVIDIA "
                              "driver") from None
        _registered.add(name)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:
        raise EngineError("--device cuda: the TensorRT-RTX execution provider is installed but finds no NVIDIA RTX "
                          "(Ampere or later) GPU here; run with --device cpu")
    if device_id >= len(devices):
        raise EngineError(f"--device cuda:{device_id}: the TensorRT-RTX execution provider sees {len(devices)} "
                          f"GPU(s); choose cuda:0..{len(devices) - 1}")
    return [devices[device_id]]


def add_to_session(ort, options, device_id: int = 0) -> None:
    """Attach the TensorRT-RTX EP to `options` (sessions created with them then take no providers= list)."""
    options.add_provider_for_devices(ep_devices(ort, device_id), {})
