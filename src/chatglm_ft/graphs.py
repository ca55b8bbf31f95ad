"""The one captured-step machine: compile settings, warm-up, CUDA-graph capture and replay.

Both decoders use it: the single-stream decoder of fast.py (keys: attention bucket and sampling
mode) and the server's slot decoder in batching.py (keys: batch bucket and attention bucket).
A step is a callable without arguments that reads static buffers and writes static buffers;
`StepGraphs.run(key, step)` runs it directly for its first WARMUP_RUNS calls of a key (on the
capture stream, so lazily created handles and workspaces exist before capture), then captures
it and from then on replays the graph: one launch instead of hundreds of small kernels from
Python. Off CUDA, or with graphs off, the step simply runs.

Compiled code is cached on disk by inductor ($TORCHINDUCTOR_CACHE_DIR, default
/tmp/torchinductor_$USER), so a second process compiles much faster.
"""
from __future__ import annotations

import time
from typing import Callable, Hashable

import torch

WARMUP_RUNS = 2  # direct runs of a step before it is captured


def inductor_options(device: torch.device, gemv: str = "kernel") -> dict | None:
    """torch.compile options of the decode steps (both decoders)."""
    if device.type != "cuda":
        return None
    # coordinate_descent_tuning also makes inductor turn one-row matmuls into reductions it tunes and
    # fuses (the gpt-fast recipe); unique kernel names make profiles readable.
    options = {"coordinate_descent_tuning": gemv == "triton", "triton.unique_kernel_names": True}
    from .kernels import pdl_supported

    if hasattr(torch._inductor.config.triton, "enable_pdl") and pdl_supported(device.index or 0):
        options["triton.enable_pdl"] = True  # inductor's kernels launch early too (kernels.pdl_supported)
    return options


def compile_step(fn: Callable, device: torch.device, gemv: str = "kernel") -> Callable:
    """`fn` compiled as a decode step (static shapes but for what the caller marks dynamic)."""
    # one compiled graph per model, batch size and dtype: allow more than dynamo's default of 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False, options=inductor_options(device, gemv))


class StepGraphs:
    """Warm-up, capture and replay of steps keyed by `key`; timings in `stats`."""

    def __init__(self, device: torch.device, *, cuda_graphs: bool = True, warmup_runs: int = WARMUP_RUNS):
        self.cuda = device.type == "cuda"
        self.capture = cuda_graphs and self.cuda
        self.warmup_runs = warmup_runs
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.runs: dict[Hashable, int] = {}  # direct runs so far, per key
        self.stats = {"compile_seconds": 0.0, "capture_seconds": 0.0, "graphs": 0}
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
        if self.capture:
            self.pool = torch.cuda.graph_pool_handle()

    def timed(self, fn: Callable, *args):
        """A run that may compile: timed on its own (bench reports compile time separately)."""
        if self.cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        result = fn(*args)
        if self.cuda:
            torch.cuda.synchronize()
        self.stats["compile_seconds"] += time.perf_counter() - began
        return result

    def on_capture_stream(self, fn: Callable, *args, timed: bool = False):
        """Run `fn` on the capture stream (warm-up: what it creates lazily must exist before capture)."""
        if not self.capture:
            return self.timed(fn, *args) if timed else fn(*args)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            result = self.timed(fn, *args) if timed else fn(*args)
        torch.cuda.current_stream().wait_stream(self.stream)
        return result

    def run(self, key: Hashable, step: Callable[[], None]) -> None:
        """One run of the step of `key`: direct while warming up, then a graph replay."""
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        runs = self.runs.get(key, 0)
        if not self.capture or runs < self.warmup_runs:
            self.runs[key] = runs + 1
            self.on_capture_stream(step, timed=runs == 0)  # the first run of a key may compile
            return
        began = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        # capture records the step without running it; the state it reads is untouched
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            step()
        torch.cuda.current_stream().wait_stream(self.stream)
        self.graphs[key] = graph
        self.stats["capture_seconds"] += time.perf_counter() - began
        self.stats["graphs"] = len(self.graphs)
        graph.replay()
