"""The server's decode step over cache slots (engine.py), run through graphs.StepGraphs."""
from __future__ import annotations

import time

import torch

from .graphs import StepGraphs, compile_step
from .steps import decode_one_token


def decode_step(model, token: torch.Tensor, meta: torch.Tensor, kv_positions: torch.Tensor) -> torch.Tensor:
    """One token for each of the cache slots [0, B): float32 logits (B, V).

    token (B, 1): the token each slot feeds back; meta (B, 1 + state): per slot the column that token
    sits at, then the slot's layout state (model.slot_layout: for ChatGLM-6B the <sop> and [gMASK]
    columns of its prompt; slots start at column 0); attention runs over the first len(kv_positions)
    cache columns (a tensor, so a compiled step can keep it dynamic).
    """
    B = token.shape[0]
    return decode_one_token(model, token, meta[:, 0:1], model.slot_layout(meta[:, 1:]), kv_positions.shape[0],
                            cache_rows=slice(0, B))  # the slots in place, no copy


def batch_bucket(rows: int, max_batch: int) -> int:
    """Batch size a captured step runs at: the next power of two, at most max_batch."""
    size = 1
    while size < rows:
        size *= 2
    return min(size, max_batch)


KV_BUCKET = 128  # attention lengths of captured steps are multiples of this


class DecodeGraphs:
    """The slot decode step, one captured graph per (batch bucket, attention bucket).

    Eager decoding launches hundreds of small kernels per token from Python, which at small
    batches takes longer than the GPU needs to run them; a replay is one launch. A step reads its
    inputs from static buffers (the engine's last tokens and `meta`) and writes `logits`. Idle
    rows of a bucket write the scratch column and are ignored. With `compile` the step is also
    compiled (torch.compile; slow to start, fewer and fused kernels). Off CUDA the same bucketed
    step runs directly (what the CPU tests exercise).
    """

    def __init__(self, model, last_token: torch.Tensor, max_batch: int, max_kv: int, *, compile: bool = False,
                 gemv: str = "kernel"):
        # max_kv stays below the cache length (the scratch column): were a bucket the whole cache, a compiled step
        # would specialise on it
        device = last_token.device
        self.model, self.last_token, self.max_batch, self.max_kv = model, last_token, max_batch, max_kv
        self.meta = torch.zeros(max_batch, 1 + len(model.idle_slot_state()), dtype=torch.long, device=device)
        self.logits = torch.zeros(max_batch, model.config.vocab_size, dtype=torch.float32, device=device)
        self.positions = torch.arange(max_kv, device=device)
        self.cuda = device.type == "cuda"
        self.step = decode_step
        self.compiled = compile
        if compile:
            # the attention length and the batch dynamic: three compiles in all (1 row; 2-16 rows, the skinny
            # matmul's range; more), each reused by every bucket in its range
            self.step = compile_step(decode_step, device, gemv)
        self.machine = StepGraphs(device)

    @property
    def graphs(self) -> dict:
        return self.machine.graphs

    def kv_bucket(self, kv_length: int) -> int:
        return min(-(-kv_length // KV_BUCKET) * KV_BUCKET, self.max_kv)

    def _kv_positions(self, size: int) -> torch.Tensor:
        positions = self.positions[:size]
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(positions, 0)  # as fast.py: a specialising backend recompiles, not fails
        return positions

    def _run_step(self, rows: int, size: int) -> None:
        token, meta = self.last_token[:rows, None], self.meta[:rows]
        if self.compiled and rows > 1:  # one row stays a static graph of its own (dynamo specialises size 1)
            torch._dynamo.maybe_mark_dynamic(token, 0)
            torch._dynamo.maybe_mark_dynamic(meta, 0)
        self.logits[:rows].copy_(self.step(self.model, token, meta, self._kv_positions(size)))

    def idle_meta(self, rows: int) -> torch.Tensor:
        """meta of `rows` idle slots: they write the scratch column only."""
        idle = torch.tensor([self.max_kv, *self.model.idle_slot_state()], device=self.meta.device)
        return idle.expand(rows, -1)

    def warm_up(self, batch_sizes: list[int], *, capture: bool = True) -> float:
        """Compile and (with `capture`) capture the steps of these batch buckets now (at the smallest
        attention bucket), so no request waits for a compile; seconds taken. Idle rows write only the
        scratch column. Without `capture` each runs once: compiled, and captured later where it is used."""
        began = time.perf_counter()
        for rows in batch_sizes:
            for _ in range(self.machine.warmup_runs + 1 if capture else 1):
                self.run(self.idle_meta(rows), 1)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - began

    def run(self, meta: torch.Tensor, kv_length: int) -> torch.Tensor:
        """Logits (rows, V) for `meta` (rows, 1 + state) with rows a batch bucket."""
        rows, size = meta.shape[0], self.kv_bucket(kv_length)
        self.meta[:rows].copy_(meta)
        # a step rewrites the same cache entries, so repeating it while warming up is harmless
        self.machine.run((rows, size), lambda: self._run_step(rows, size))
        return self.logits[:rows]
