"""Building blocks of continuous batching (engine.py): per-row sampling on the device and the
decode step over cache slots with its CUDA graphs."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .generate import GenerationConfig, process_logits
from .positions import PrefixLayout, attention_mask_for, position_ids_for

GREEDY = GenerationConfig()


# -- per-row sampling -----------------------------------------------------------------------------
@dataclass
class RowSampling:
    """Sampling settings of each row of a batch, as (B,) tensors on the model's device."""

    do_sample: torch.Tensor  # bool
    temperature: torch.Tensor  # float; 1 for greedy rows
    top_p: torch.Tensor  # float in (0, 1]
    top_k: torch.Tensor  # long; 0 = off
    uniform: torch.Tensor  # float in [0, 1): the draw of each row's own generator


def nucleus(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row temperature, top-k and top-p, with the rules of `generate.process_logits`.

    Returns the kept probabilities in descending order (B, V) and the vocabulary ids of that order.
    """
    scores = logits / temperature[:, None]
    sorted_scores, order = scores.sort(dim=-1, descending=True)  # (B, V) each
    rank = torch.arange(scores.shape[-1], device=scores.device)[None, :]
    outside_k = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = sorted_scores.masked_fill(outside_k, float("-inf")).softmax(dim=-1)
    # as transformers: drop a token once the more likely ones already reach top_p (the first is always kept)
    outside_p = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
    return probs.masked_fill(outside_p, 0.0), order


def sample_tokens(logits: torch.Tensor, rows: RowSampling | None) -> torch.Tensor:
    """(B, V) float32 logits -> (B,) token ids: the argmax, or for sampling rows an inverse-CDF draw."""
    logits = process_logits(logits, GREEDY, None)  # the original's NaN/Inf guard
    greedy = logits.argmax(dim=-1)
    if rows is None:
        return greedy
    probs, order = nucleus(logits, rows.temperature, rows.top_k, rows.top_p)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = (rows.uniform * cdf[:, -1])[:, None]
    pick = torch.searchsorted(cdf, target).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    sampled = order.gather(-1, pick).squeeze(-1)
    return torch.where(rows.do_sample, sampled, greedy)


# -- the decode step --------------------------------------------------------------------------------
def decode_step(model, token: torch.Tensor, meta: torch.Tensor, kv_positions: torch.Tensor) -> torch.Tensor:
    """One token for each of the cache slots [0, B): float32 logits (B, V).

    token (B, 1): the token each slot feeds back; meta (B, 3): per slot the column that token sits
    at, and the <sop> and [gMASK] columns of its prompt (slots start at column 0); attention runs
    over the first len(kv_positions) cache columns (a tensor, so a compiled step can keep it dynamic).
    """
    B = token.shape[0]
    column = meta[:, 0:1]  # (B, 1)
    layout = PrefixLayout(start=torch.zeros_like(meta[:, 1]), context=meta[:, 1], mask=meta[:, 2])
    kv_length = kv_positions.shape[0]
    return model(
        token,
        position_ids_for(layout, column),
        attention_mask_for(layout, column, kv_length),
        cache_columns=column,
        kv_length=kv_length,
        cache_rows=slice(0, B),  # the slots in place, no copy
        last_logits_only=True,
    ).logits[:, -1].float()


def batch_bucket(rows: int, max_batch: int) -> int:
    """Batch size a captured step runs at: the next power of two, at most max_batch."""
    size = 1
    while size < rows:
        size *= 2
    return min(size, max_batch)


KV_BUCKET = 128  # attention lengths of captured steps are multiples of this


class DecodeGraphs:
    """The decode step as CUDA graphs, one per (batch bucket, attention bucket), captured on first use.

    Eager decoding launches hundreds of small kernels per token from Python, which at small
    batches takes longer than the GPU needs to run them; a replay is one launch. A step reads its
    inputs from static buffers (the engine's last tokens and `meta`) and writes `logits`. Idle
    rows of a bucket write the scratch column and are ignored. With `compile` the step is also
    compiled (torch.compile; slow to start, fewer and fused kernels). Off CUDA the same bucketed
    step runs directly (what the CPU tests exercise).
    """

    WARMUP_RUNS = 2  # direct runs before capture: lazy initialisation must not happen inside a graph

    def __init__(self, model, last_token: torch.Tensor, max_batch: int, max_kv: int, *, compile: bool = False):
        # max_kv stays below the cache length (the scratch column): were a bucket the whole cache, a compiled step
        # would specialise on it
        device = last_token.device
        self.model, self.last_token, self.max_batch, self.max_kv = model, last_token, max_batch, max_kv
        self.meta = torch.zeros(max_batch, 3, dtype=torch.long, device=device)
        self.logits = torch.zeros(max_batch, model.config.vocab_size, dtype=torch.float32, device=device)
        self.positions = torch.arange(max_kv, device=device)
        self.cuda = device.type == "cuda"
        self.step = decode_step
        self.compiled = compile
        if compile:
            from .fast import inductor_options

            # the attention length and the batch dynamic: three compiles in all (1 row; 2-16 rows, the skinny
            # matmul's range; more), each reused by every bucket in its range
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.step = torch.compile(decode_step, dynamic=False, options=inductor_options(device))
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.runs: dict[tuple[int, int], int] = {}
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.pool = torch.cuda.graph_pool_handle()

    def kv_bucket(self, kv_length: int) -> int:
        return min(-(-kv_length // KV_BUCKET) * KV_BUCKET, self.max_kv)

    def _kv_positions(self, size: int) -> torch.Tensor:
        positions = self.positions[:size]
        if self.compiled:
            torch._dynamo.mark_dynamic(positions, 0, min=2, max=self.max_kv)
        return positions

    def _run_step(self, rows: int, size: int) -> None:
        token, meta = self.last_token[:rows, None], self.meta[:rows]
        if self.compiled and rows > 1:  # one row stays a static graph of its own (dynamo specialises size 1)
            torch._dynamo.maybe_mark_dynamic(token, 0)
            torch._dynamo.maybe_mark_dynamic(meta, 0)
        self.logits[:rows].copy_(self.step(self.model, token, meta, self._kv_positions(size)))

    def warm_up(self, batch_sizes: list[int]) -> float:
        """Compile and capture the steps of these batch buckets now (at the smallest attention bucket),
        so no request waits for a compile; seconds taken. Idle rows write only the scratch column."""
        began = time.perf_counter()
        idle = torch.tensor([self.max_kv, 1, 0], device=self.meta.device)
        for rows in batch_sizes:
            for _ in range(self.WARMUP_RUNS + 1):
                self.run(idle.expand(rows, 3), 1)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - began

    def run(self, meta: torch.Tensor, kv_length: int) -> torch.Tensor:
        """Logits (rows, V) for `meta` (rows, 3) with rows a batch bucket."""
        rows, size = meta.shape[0], self.kv_bucket(kv_length)
        self.meta[:rows].copy_(meta)
        key = (rows, size)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
        elif not self.cuda:
            self._run_step(rows, size)
        elif self.runs.get(key, 0) < self.WARMUP_RUNS:
            # warm-up on the capture stream; a step rewrites the same cache entries, so repeating it is harmless
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self._run_step(rows, size)
            torch.cuda.current_stream().wait_stream(self.stream)
            self.runs[key] = self.runs.get(key, 0) + 1
        else:
            graph = torch.cuda.CUDAGraph()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                self._run_step(rows, size)  # recorded, not run
            torch.cuda.current_stream().wait_stream(self.stream)
            self.graphs[key] = graph
            graph.replay()
        return self.logits[:rows]
