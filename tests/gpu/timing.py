"""Kernel timing for the GPU tables: the calls are captured in a CUDA graph and its replays
timed with events, so the figure is the device's time, not the Python wrapper's launch cost
(timing single eager calls of a ~10 us kernel measures the host)."""

from __future__ import annotations

import torch
from triton.testing import do_bench


def graphed_us(fn, calls: int = 20) -> float:
    """Median device time of one ``fn()`` in microseconds (``calls`` calls per replay)."""
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median") * 1e3 / calls
