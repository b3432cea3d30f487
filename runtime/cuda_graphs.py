"""CUDA graphs for the torch and aoti backends' engine calls: one graph per (engine, input shapes) bucket, captured once
and replayed every later call of that bucket (the loop's calls have few buckets: batch rows x fed width, with the
whole cache buffer passed, so its shape is fixed for a run).

A replay runs on static buffers: the call's inputs are copied into the bucket's input buffers (the KV caches too,
a device-to-device copy: microseconds, where a small-batch call's hundreds of kernel launches cost milliseconds),
the graph replays, and the outputs are cloned out of its static output buffers before the next replay can
overwrite them. `capture` is pluggable: `cuda_capture` (torch.cuda.CUDAGraph, warm-up on a side stream) on CUDA;
the tests pass a stand-in that records the function and replays it eagerly on the same static buffers, so the
bucketing, the copies and the output cloning are checked without a GPU.
"""
from __future__ import annotations

from typing import Callable

import torch


def cuda_capture(fn: Callable, static_inputs: list) -> Callable:
    """Capture fn(*static_inputs) into a CUDA graph; returns replay() -> the static outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):                        # warm-up outside the graph (allocator, lazy kernels)
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static_inputs)

    def replay():
        graph.replay()
        return outputs

    return replay


class GraphedCalls:
    """fn(name, *tensors) -> tuple of tensors, run through one captured graph per (name, shapes, dtypes)."""

    def __init__(self, fn: Callable, capture: Callable = cuda_capture):
        self.fn, self.capture = fn, capture
        self.buckets: dict = {}     # key -> (static inputs, replay)
        self.captures = 0

    def __call__(self, name: str, *inputs: torch.Tensor) -> tuple:
        key = (name,) + tuple((tuple(t.shape), t.dtype) for t in inputs)
        bucket = self.buckets.get(key)
        if bucket is None:
            static = [t.clone() for t in inputs]
            replay = self.capture(lambda *a: self.fn(name, *a), static)
            bucket = self.buckets[key] = (static, replay)
            self.captures += 1
        static, replay = bucket
        for buffer, value in zip(static, inputs):
            buffer.copy_(value)
        outputs = replay()
        return tuple(t.clone() for t in ((outputs,) if isinstance(outputs, torch.Tensor) else outputs))
