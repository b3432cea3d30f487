"""Flush denormal floats to zero on the calling thread for the span of an engine call, and only then.

A masked attention key's score is 0 / -inf added, and the softmax's exp of it underflows through denormal floats,
which x86 computes several times slower (measured with ONNX Runtime on this project's CPU: a softmax over
[8, 4, 5, 80] with ragged masked keys 46 us, 10 us flushed). ONNX Runtime's own switch
(`session.set_denormal_as_zero`) sets the flags once per process on the thread that creates the first session and
leaves them there: numpy, torch and the user's code on that thread then flush too (hypothesis, for one, refuses to
run). So the flags are set here around each call and the caller's floating-point environment is put back after it,
through the C library's fegetenv/fesetenv (~1.5 us a call). Linux on x86-64 (MXCSR FTZ | DAZ) and aarch64 (FPCR FZ)
only; elsewhere `available` is False and calls run as they are. Only the calling thread is flushed: with more than
one intra-op thread, ONNX Runtime's pool threads keep the floating-point state they were created with (the default
backend setting is one thread, which computes on the caller's).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
import threading

# (byte offset of the 32-bit control word holding the flags in glibc's / musl's fenv_t, the flag bits)
_LAYOUTS = {
    "x86_64": (28, 0x8040),          # the 28-byte x87 FNSTENV image, then MXCSR: FTZ (bit 15) | DAZ (bit 6)
    "aarch64": (0, 1 << 24),         # {fpcr, fpsr}: FPCR.FZ (bit 24) flushes inputs and outputs
}
_ENV_BYTES = 64                      # room for fenv_t (32 / 8 bytes there) and then some


def _libm():
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("m")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if lib is None or not all(hasattr(lib, f) for f in ("fegetenv", "fesetenv")):
        return None
    return lib


def _denormal_product() -> float:
    import numpy as np

    return float((np.array([1e-38], np.float32) * np.float32(0.01))[0])


class DenormalFlush:
    """`with flush:` runs its body with denormals flushed to zero on this thread, then restores the thread's
    floating-point environment exactly as it was (control and status flags). Each thread keeps its own saved
    environment; nested uses toggle only at the outermost level."""

    def __init__(self, enabled: bool = True):
        layout = _LAYOUTS.get(platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64"))
        lib = _libm() if enabled and layout else None
        self.available = lib is not None
        self._local = threading.local()
        if self.available:               # checked once: a denormal product reads 0 inside, not after
            self._offset, self._bits = layout
            self._get, self._set = lib.fegetenv, lib.fesetenv
            with self:
                flushed = _denormal_product() == 0.0
            self.available = flushed and _denormal_product() != 0.0

    def _make_buffers(self, local) -> None:
        """This thread's two environments: `saved` (the caller's, read at each outermost entry) and `flushed` (set
        while inside), with 32-bit views of their control word."""
        local.saved = (ctypes.c_ubyte * _ENV_BYTES)()
        local.flushed = (ctypes.c_ubyte * _ENV_BYTES)()
        self._get(local.saved)
        ctypes.memmove(local.flushed, local.saved, _ENV_BYTES)
        local.saved_word = ctypes.c_uint32.from_buffer(local.saved, self._offset)
        local.flushed_word = ctypes.c_uint32.from_buffer(local.flushed, self._offset)
        local.depth = 0

    def __enter__(self):
        if self.available:
            local = self._local
            if not hasattr(local, "depth"):
                self._make_buffers(local)
            local.depth += 1
            if local.depth == 1:
                # the caller's environment now, and the flushed one: its control word is the caller's with the
                # flags set (rounding mode and masks kept); the rest, x87 state / status flags the engine does not
                # read, is this thread's first environment, and the caller's comes back whole at the exit
                self._get(local.saved)
                local.flushed_word.value = local.saved_word.value | self._bits
                self._set(local.flushed)
        return self

    def __exit__(self, *exc):
        if self.available:
            local = self._local
            local.depth -= 1
            if local.depth == 0:
                self._set(local.saved)
        return False
