"""Timing GPU work without launch overhead, for the gpu/ benchmark scripts."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def graph_seconds(calls: Sequence[Callable[[], object]], repeats: int = 5) -> float:
    """Seconds per call of `calls` (no-argument launches), captured once as a CUDA graph and replayed:
    what the work costs inside a captured decode step. Every call runs once first, outside the
    capture (Triton compiles, cuBLAS picks its kernels); pass calls over enough different weight
    copies that L2 cannot hold them when the number should come from HBM."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / (repeats * len(calls))
