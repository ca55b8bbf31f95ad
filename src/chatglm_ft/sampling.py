"""The one sampler: float32 logits (B, V) -> the next token of each row, for every decode path
(eager `generate`, the compiled/graphed decoder, the server engine, evaluation).

The order is the original (transformers) pipeline's: repetition penalty, NaN/Inf guard, then for
sampling rows temperature, top-k, top-p and min-p. Greedy is the argmax of the guarded scores
(temperature 0 means greedy). Every setting is per row (`RowSettings`, (B,) tensors), so one
batch mixes greedy and sampling rows with different settings, and a scalar `GenerationConfig`
simply broadcasts to all rows.

The draw: row b's k-th token (k = 0 for the token after the prompt) is picked by inverse CDF with
the uniform number `uniform(seed_b, k)`, a counter-based hash computed on the device. So there is
no generator state and no host sync, the draw is the same whatever batch the row sits in (alone,
in a padded batch, in a server slot), and the same on the CPU and on CUDA.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .generation_config import GenerationConfig

NAN_GUARD_TOKEN_ID = 5  # the original replaces bad logits by zeros with 5e4 at id 5
_MASK32 = 0xFFFFFFFF


SEED_BITS = 62


def random_seed() -> int:
    """A seed for a request that gave none (drawn on the host once per request, not per token)."""
    return random.getrandbits(SEED_BITS)


def request_seed(gen: GenerationConfig) -> int:
    """The seed of one request (its row's draws): the given one (any int), else a random one."""
    return gen.seed & ((1 << SEED_BITS) - 1) if gen.seed is not None else random_seed()


def row_seeds(gen: GenerationConfig, rows: int) -> list[int]:
    """Seeds of a batch generated with one config: every row takes the config's seed, so a row's tokens do
    not depend on the rows beside it (a prompt gives the same answer alone and in a batch); without a
    seed each row draws its own."""
    if gen.seed is not None:
        return [request_seed(gen)] * rows
    return [random_seed() for _ in range(rows)]


# -- scores ----------------------------------------------------------------------------------------
def chunked(x: torch.Tensor, chunks: int = 32) -> torch.Tensor:
    """(B, V) as (B, chunks, V / chunks): a reduction over the vocabulary in two stages, so the compiled
    kernel spreads one row over `chunks` programs (one program per row took 35 us of a 3.8 ms token)."""
    B, V = x.shape
    return x.view(B, chunks, V // chunks) if V % chunks == 0 else x.view(B, 1, V)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of (B, V) (the first maximum, as torch.argmax); compiled, in two stages."""
    if not torch.compiler.is_compiling():
        return x.argmax(dim=-1)  # eager: one kernel
    parts = chunked(x)
    values, index = parts.max(dim=-1)  # (B, chunks): first maximum of each chunk
    best = values.argmax(dim=-1, keepdim=True)  # the first chunk holding the row maximum
    return (index.gather(1, best) + best * parts.shape[-1]).squeeze(1)


def guarded_scores(logits: torch.Tensor, seen: torch.Tensor | None = None,
                   penalty: torch.Tensor | None = None) -> torch.Tensor:
    """Repetition penalty (transformers' rule, on the `seen` (B, V) tokens; `penalty` (B,) or a scalar
    tensor) and the NaN/Inf guard. A penalty of 1 leaves every value exactly as it is."""
    if seen is not None and penalty is not None:
        p = penalty[:, None] if penalty.dim() == 1 else penalty
        penalised = torch.where(logits < 0, logits * p, logits / p)
        logits = torch.where(seen, penalised, logits)
    bad = ~torch.isfinite(chunked(logits)).all(dim=-1).all(dim=-1, keepdim=True)  # (B, 1)
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    guard = torch.where(vocab == min(NAN_GUARD_TOKEN_ID, logits.shape[-1] - 1), 5e4, 0.0)  # (V,)
    return torch.where(bad, guard, logits)


def kept_probs(scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row temperature, top-k, top-p and min-p on guarded scores (B, V).

    Returns the kept probabilities in descending order (B, V), zero where dropped, and the vocabulary
    ids of that order. One (stable) sort serves all three filters.
    """
    scaled = scores / temperature[:, None]
    sorted_scores, order = scaled.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(scores.shape[-1], device=scores.device)[None, :]
    outside_k = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = sorted_scores.masked_fill(outside_k, float("-inf")).softmax(dim=-1)
    # as transformers: drop a token once the more likely ones already reach top_p (the first is always kept)
    outside_p = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
    # min-p compares with the most likely token; renormalising after top-k/top-p keeps that ratio
    outside_min = probs < min_p[:, None] * probs[:, :1]
    return probs.masked_fill(outside_p | outside_min, 0.0), order


# -- the draw --------------------------------------------------------------------------------------
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2^32); multipliers below 2^31
    keep every product inside int64, so CPU and CUDA (and compiled code) agree bit for bit."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The uniform number in (0, 1) of draw `step` of a row seeded `seed` (both (B,) long, seed >= 0)."""
    h = _mix32(seed & _MASK32)
    h = _mix32(h ^ ((seed >> 32) & _MASK32))
    h = _mix32(h ^ (step & _MASK32))
    return ((h >> 8).float() + 0.5) / float(1 << 24)


def draw(probs: torch.Tensor, order: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from kept probabilities in descending order: (B,) token ids."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = (u * cdf[:, -1])[:, None]
    pick = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    return order.gather(-1, pick).squeeze(-1)


# -- per-row settings --------------------------------------------------------------------------------
@dataclass
class RowSettings:
    """Sampling settings of each row of a batch, as (B,) tensors on the model's device. The tensors
    may be static buffers of a captured step: `fill` rewrites them in place."""

    sample: torch.Tensor  # bool: False = greedy
    temperature: torch.Tensor  # float32; 1 for greedy rows
    top_k: torch.Tensor  # long; 0 = off
    top_p: torch.Tensor  # float32 in (0, 1]
    min_p: torch.Tensor  # float32 in [0, 1]
    penalty: torch.Tensor  # float32 repetition penalty; 1 = off
    seed: torch.Tensor  # long, >= 0
    any_sample: bool = False  # host-side summaries: skip the work no row needs
    any_penalty: bool = False

    @classmethod
    def empty(cls, rows: int, device: torch.device | str) -> "RowSettings":
        floats = dict(dtype=torch.float32, device=device)
        longs = dict(dtype=torch.long, device=device)
        return cls(sample=torch.zeros(rows, dtype=torch.bool, device=device), temperature=torch.ones(rows, **floats),
                   top_k=torch.zeros(rows, **longs), top_p=torch.ones(rows, **floats), min_p=torch.zeros(rows, **floats),
                   penalty=torch.ones(rows, **floats), seed=torch.zeros(rows, **longs))

    @classmethod
    def of(cls, configs: Sequence[GenerationConfig | None], seeds: Sequence[int], device: torch.device | str
           ) -> "RowSettings":
        settings = cls.empty(len(configs), device)
        settings.fill(configs, seeds)
        return settings

    def fill(self, configs: Sequence[GenerationConfig | None], seeds: Sequence[int]) -> None:
        """Row i takes configs[i] (None: an idle, greedy row) and seeds[i]; rows past len(configs) go greedy."""
        rows = self.seed.shape[0]
        sample = [False] * rows
        floats = [[1.0] * rows, [1.0] * rows, [0.0] * rows, [1.0] * rows]  # temperature, top_p, min_p, penalty
        longs = [[0] * rows, [0] * rows]  # top_k, seed
        for i, (gen, seed) in enumerate(zip(configs, seeds)):
            if gen is None:
                continue
            sample[i] = gen.do_sample
            if gen.do_sample:
                floats[0][i], floats[1][i], floats[2][i] = gen.temperature, gen.top_p, gen.min_p
                longs[0][i] = gen.top_k
            floats[3][i] = gen.repetition_penalty
            longs[1][i] = seed
        self.any_sample = any(sample)
        self.any_penalty = any(p != 1.0 for p in floats[3])
        device = self.seed.device
        f = _to_device(floats, torch.float32, device)
        n = _to_device(longs, torch.long, device)
        self.sample.copy_(_to_device(sample, torch.bool, device))
        self.temperature.copy_(f[0])
        self.top_p.copy_(f[1])
        self.min_p.copy_(f[2])
        self.penalty.copy_(f[3])
        self.top_k.copy_(n[0])
        self.seed.copy_(n[1])


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)  # no sync: the caching host allocator keeps it alive
    return t.to(device)


def choose(logits: torch.Tensor, rows: RowSettings, step: torch.Tensor, seen: torch.Tensor | None = None,
           *, sample: bool | None = None) -> torch.Tensor:
    """(B, V) float32 logits -> (B,) tokens: the argmax of the guarded scores for greedy rows, a draw
    `step` ((B,) long: the index of the token being chosen) for sampling rows. `seen` (B, V) bool marks
    the tokens the repetition penalty applies to. `sample` overrides `rows.any_sample` (a captured
    step fixes it when captured)."""
    penalised = seen is not None and (rows.any_penalty or sample is not None)
    scores = guarded_scores(logits, seen if penalised else None, rows.penalty)
    greedy = argmax_rows(scores)
    if not (rows.any_sample if sample is None else sample):
        return greedy
    probs, order = kept_probs(scores, rows.temperature, rows.top_k, rows.top_p, rows.min_p)
    sampled = draw(probs, order, uniform(rows.seed, step))
    return torch.where(rows.sample, sampled, greedy)


def mark_seen(seen: torch.Tensor, token_ids: torch.Tensor, keep: torch.Tensor | None = None) -> None:
    """Mark `token_ids` (B, T) in `seen` (B, V), where `keep` (B, T) is True (all when None)."""
    seen.scatter_(1, token_ids, True if keep is None else keep)
