"""CUDA graphs captured per shape key (a batch-size bucket), replayed thereafter.

A captured function reads and writes only tensors whose addresses do not change between
calls (the caller's static buffers, filled before each call) and must not synchronise
with the host; the capture fails loudly if it does. With graphs off (``enforce_eager``,
or on the CPU) the same function simply runs, over the same padded shapes, so graphs on
and off execute the same kernels on the same inputs and give identical outputs."""

from __future__ import annotations

import gc
from typing import Callable, Hashable

import torch

# Batch-size buckets a step is padded to on the GPU (vLLM captures a similar ladder).
_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Buckets up to and including ``max_num_seqs``."""
    return [b for b in _LADDER if b < max_num_seqs] + [max_num_seqs]


def bucket_for(batch: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= batch:
            return b
    raise ValueError(f"batch of {batch} exceeds the largest bucket {buckets[-1]}")


class GraphCache:
    """``run(key)`` calls ``fn(key)``: eagerly when graphs are off, else by replaying the
    graph captured at the key's first call (after one eager warm-up on a side stream).

    Graphs that replay concurrently (on different streams) need different ``capture_stream``s:
    a captured cuBLAS call keeps the workspace of the stream it was captured on, and torch's
    graphs all capture on one default stream unless told otherwise, so two such graphs would
    share one workspace while running at the same time."""

    def __init__(self, fn: Callable[[Hashable], object], enabled: bool, pool=None, capture_error_mode: str = "global",
                 capture_stream: torch.cuda.Stream | None = None):
        self.fn = fn
        self.enabled = enabled
        self.pool = pool
        self.capture_error_mode = capture_error_mode  # "thread_local" lets other threads (NCCL's watchdog) run
        self.capture_stream = capture_stream
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, object]] = {}

    def run(self, key: Hashable):
        if not self.enabled:
            return self.fn(key)
        if key not in self.graphs:
            self.graphs[key] = self._capture(key)
        graph, outputs = self.graphs[key]
        graph.replay()
        return outputs

    def _capture(self, key):
        # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), as capture needs.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # No garbage collection while capturing: a collected object that owns a CUDA graph (an
        # engine dropped earlier) destroys it inside the capture, which invalidates the capture
        # (seen on the H200: "operation not permitted when stream is capturing (function reset)",
        # then the capture failed, after an earlier test's engines were dropped).
        # torch.cuda.graph collects once on entry.
        enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream,
                                  capture_error_mode=self.capture_error_mode):
                outputs = self.fn(key)
        finally:
            if enabled:
                gc.enable()
        return graph, outputs


def shared_pool(device: torch.device):
    """One memory pool for every graph of an engine (None on the CPU)."""
    return torch.cuda.graph_pool_handle() if device.type == "cuda" else None
