"""ONNX Runtime engine calls over torch tensors bound where they lie: the device loop and device KV caches of the
onnxruntime backend (runtime/arrays.py, runtime/kv_cache.py; issue 13 item 2).

With the CUDA execution provider the loop's token buffer, the KV caches and every engine output are torch CUDA
tensors: each input is bound by address through IOBinding (no copy), an in-place engine's cache input and output
both to layer l of the caller's [L, R, H, S, Dh] cache, and the outputs ONNX Runtime allocates on the device come
back as torch tensors through DLPack (no copy). The CPU provider takes the same path with torch CPU tensors, which
is how it is tested here (a device run equals the numpy run bit for bit). Host arrays among the inputs (the
loop's per-row lengths) are copied to the device once per call.

Streams: the CUDA provider is created on torch's current stream (`user_compute_stream`), so its kernels queue
after the torch work that produced the inputs, and ONNX Runtime synchronises that stream at the end of a run.
"""
from __future__ import annotations

import numpy as np

from .engine import check_cache_room, per_layer_cache_inputs


class TensorCalls:
    """run(name, arrays) for the sessions of an OnnxRuntimeEngines with torch inputs on `device`."""

    def __init__(self, ort, torch, sessions: dict, manifest, device):
        self.torch, self.sessions, self.manifest, self.device = torch, sessions, manifest, device
        kind = "cuda" if device.type == "cuda" else "cpu"
        self.ort_device = ort.OrtDevice.make(kind, device.index or 0)._get_c_device()
        self.types = {torch.float32: np.float32, torch.int64: np.int64}
        self.bindings: dict = {}
        self.bound_caches: dict = {}      # engine -> the cache memory its 4L cache bindings point at

    def tensor(self, a):
        """`a` as a contiguous torch tensor on the device, in an engine dtype (float32 / int64)."""
        torch = self.torch
        if not isinstance(a, torch.Tensor):
            a = np.asarray(a)
            a = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64 if a.dtype.kind in "iub" else np.float32))
        if a.dtype not in self.types:
            a = a.long() if not a.is_floating_point() else a.float()
        return a.to(self.device).contiguous()

    def bind(self, binding, name: str, t, output: bool = False) -> None:
        args = (name, self.ort_device, self.types[t.dtype], tuple(t.shape), t.data_ptr())
        (binding.bind_output if output else binding.bind_input)(*args)

    def run(self, name: str, arrays, in_place: bool, keep: int) -> list:
        """Contract inputs -> contract outputs: all torch tensors on the device when the tokens are one (the device
        loop), else numpy except the last `keep` (new keys/values of device caches)."""
        entry = self.manifest.engines[name]
        layers = entry.cache_layers
        contract = entry.outputs[:len(entry.outputs) - 2 * layers]
        device_loop = isinstance(arrays[0], self.torch.Tensor)
        binding = self.bindings.get(name)
        if binding is None:
            binding = self.bindings[name] = self.sessions[name].io_binding()._iobinding
        tensors = [self.tensor(a) for a in arrays]          # kept alive until the run is done
        plain = tensors
        if layers:
            tokens, lengths, k_cache, v_cache, *rest = tensors
            check_cache_room(name, arrays[0], np.asarray(arrays[1]) if not isinstance(arrays[1], self.torch.Tensor)
                             else arrays[1].cpu().numpy(), k_cache)
            plain = [tokens, lengths, *rest]
        names = [n for n in entry.inputs if n not in per_layer_cache_inputs(layers)]
        for n, t in zip(names, plain):
            self.bind(binding, n, t)
        for n in contract:   # allocated by ONNX Runtime on the device, each run; bound first: get_outputs' order
            binding.bind_output(n, self.ort_device)
        if layers:
            self.bind_caches(binding, name, k_cache, v_cache, layers, in_place)
        self.sessions[name]._sess.run_with_iobinding(binding, None)
        values = binding.get_outputs()
        outs = [self.torch.from_dlpack(values[i]) for i in range(len(contract))]
        if device_loop:
            return outs
        return [o.cpu().numpy() for o in outs[:len(outs) - keep]] + outs[len(outs) - keep:]

    def bind_caches(self, binding, name: str, k_cache, v_cache, layers: int, in_place: bool) -> None:
        """Layer l of the caches as k_cache_<l> / v_cache_<l>; in place, also as the updated outputs (the engine's
        TensorScatter writes into the caller's cache). Kept while the same memory is passed call after call."""
        where = (k_cache.data_ptr(), v_cache.data_ptr(), tuple(k_cache.shape), in_place)
        if self.bound_caches.get(name) == where:
            return
        for c, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            for layer in range(layers):
                self.bind(binding, f"{c}_{layer}", cache[layer])
                if in_place:
                    self.bind(binding, f"{c}_out_{layer}", cache[layer], output=True)
                else:                                        # a plain call: the updated buffers are dropped
                    binding.bind_output(f"{c}_out_{layer}", self.ort_device)
        self.bound_caches[name] = where
