"""Generation: prefill + decode as an iterator shared by chat, generate, serve and eval.

One step yields one new token per row; rows stop independently (at <eop>, a stop string or
their length budget). Sampling follows the order of the original (transformers) pipeline:
repetition penalty, NaN/Inf guard, temperature, top-k, top-p.
"""
from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch

from .errors import ChatGLMError, PromptTooLongError
from .fast import FastOptions, decoder_for, fast_options, prefill_logits, prompt_mask_for
from .model import PromptMask
from .positions import attention_mask_for, position_ids_for, prefix_layout
from .tokenizer import ChatGLMTokenizer, StreamDecoder, left_pad

NAN_GUARD_TOKEN_ID = 5  # the original replaces bad logits by zeros with 5e4 at id 5
MIN_TEMPERATURE = 1e-5  # below this, logits / temperature overflows float32 to inf: garbage, not "nearly greedy"
MAX_TEMPERATURE = 100.0


def check_temperature(value: float, name: str = "temperature") -> float:
    """A sampling temperature every route and command accepts: exactly 0 (greedy) or a finite value in
    [MIN_TEMPERATURE, MAX_TEMPERATURE]; anything else is a ChatGLMError naming the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value == 0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):
        raise ChatGLMError(f"{name} must be 0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g},"
                           f" not {value!r}")
    return float(value)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens, as in the original chat(); used when max_new_tokens is None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's eos (<eop>)
    stop_strings: tuple[str, ...] = ()
    truncate_prompt: bool = False  # drop tokens from the left instead of refusing a too-long prompt

    def validate(self) -> "GenerationConfig":
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ChatGLMError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample:
            check_temperature(self.temperature)
        if self.do_sample and self.temperature == 0:
            return replace(self, do_sample=False)  # temperature 0 means greedy
        for name in ("top_p", "repetition_penalty"):
            if getattr(self, name) != getattr(self, name):  # NaN passes every comparison below
                raise ChatGLMError(f"{name} must be a number, not nan")
        if not 0 < self.top_p <= 1:
            raise ChatGLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ChatGLMError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ChatGLMError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self


@dataclass
class Generation:
    token_ids: list[int]
    text: str = ""
    finish_reason: str = "length"  # "stop" (eop or stop string) or "length"
    prompt_tokens: int = 0
    stats: dict = field(default_factory=dict)


# -- logits processing ---------------------------------------------------------------------------
def process_logits(logits: torch.Tensor, gen: GenerationConfig, seen: torch.Tensor | None) -> torch.Tensor:
    """(B, V) float32 logits -> processed scores; greedy uses the argmax of these."""
    if gen.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * gen.repetition_penalty, logits / gen.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    bad = ~torch.isfinite(logits).all(dim=-1, keepdim=True)  # (B, 1)
    guard = torch.zeros_like(logits)
    guard[:, min(NAN_GUARD_TOKEN_ID, logits.shape[-1] - 1)] = 5e4
    logits = torch.where(bad, guard, logits)
    if not gen.do_sample:
        return logits
    logits = logits / gen.temperature
    if gen.top_k > 0:
        kth = torch.topk(logits, min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # as transformers: drop a token once the more likely ones already reach top_p (the first is always kept)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= gen.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(scores: torch.Tensor, gen: GenerationConfig, rng: torch.Generator | None) -> torch.Tensor:
    if not gen.do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


# -- prompt checks -------------------------------------------------------------------------------
def fit_prompts(prompts: Sequence[Sequence[int]], gen: GenerationConfig, max_sequence_length: int) -> list[list[int]]:
    rows = [list(p) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ChatGLMError("empty prompt: nothing to generate from")
    for i, r in enumerate(rows):
        if len(r) > max_sequence_length:
            if not gen.truncate_prompt:
                raise PromptTooLongError(
                    f"prompt {i} has {len(r)} tokens, more than the model's max_sequence_length {max_sequence_length};"
                    " shorten it, drop history, or ask for left truncation (--truncate)"
                )
            reserve = min(gen.max_new_tokens or 256, max_sequence_length // 2)
            rows[i] = r[-(max_sequence_length - reserve):]
    return rows


def new_token_budget(prompt_length: int, gen: GenerationConfig, max_sequence_length: int) -> int:
    if gen.max_new_tokens is not None:
        budget = gen.max_new_tokens
    elif gen.max_length is not None:
        budget = gen.max_length - prompt_length
    else:
        budget = max_sequence_length - prompt_length
    return max(0, min(budget, max_sequence_length - prompt_length))


# -- the decode loop -----------------------------------------------------------------------------
@torch.inference_mode()
def stream_tokens(
    model, prompts: Sequence[Sequence[int]], gen: GenerationConfig, *, fast: bool | FastOptions | None = None
) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each row (None once a row has finished).

    Rows are left-padded into one batch; a row's stop token ends it and is not yielded. `fast`
    picks the decode loop: None (default) the compiled, CUDA-graphed one of fast.py on CUDA
    (unless $CHATGLM_FT_COMPILE=0) and the eager one on the CPU; True or False force it.
    """
    gen = gen.validate()
    config = model.config
    rows = fit_prompts(prompts, gen, config.max_sequence_length)
    input_ids = torch.tensor(left_pad(rows, config.pad_token_id), dtype=torch.long, device=model.device)
    B, T = input_ids.shape
    budget = new_token_budget(T, gen, config.max_sequence_length)
    if budget == 0:
        return
    prompt_mask = prompt_mask_for(rows, config)
    # the compiled, graphed loop of fast.py knows ChatGLM-6B's positions only; other networks decode eagerly
    options = fast_options(model, fast) if not hasattr(model, "step_inputs") else None
    if options is None:
        steps = eager_steps(model, input_ids, budget, gen, prompt_mask)
    else:
        steps = decoder_for(model, B, options).steps(input_ids, budget, gen, prompt_mask)
    stop_token_ids = set(gen.stop_token_ids if gen.stop_token_ids is not None else (config.eos_token_id,))
    finished = [False] * B
    with closing(steps):
        for tokens in steps:
            finished = [done or t in stop_token_ids for done, t in zip(finished, tokens)]
            yield [None if done else t for t, done in zip(tokens, finished)]
            if all(finished):
                return


def eager_steps(model, input_ids: torch.Tensor, budget: int, gen: GenerationConfig,
                prompt_mask: PromptMask | None = None) -> Iterator[list[int]]:
    """The plain loop: prefill, then one forward per token over the cache's used columns."""
    config = model.config
    device = input_ids.device
    B, T = input_ids.shape
    own_steps = hasattr(model, "step_inputs")  # a network with its own positions and masks (ChatGLM2/3)
    layout = model.decode_layout(input_ids) if own_steps else prefix_layout(input_ids, config)
    model.setup_caches(B, T + budget)
    rng = None
    if gen.do_sample:
        rng = torch.Generator(device=device)
        rng.manual_seed(gen.seed if gen.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    seen = None
    if gen.repetition_penalty != 1.0:
        seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids, input_ids != config.pad_token_id)

    if own_steps:
        logits = step_logits(model, input_ids, layout, torch.arange(T, device=device), T)
    else:
        logits = prefill_logits(model, input_ids, layout, prompt_mask)
    for step in range(budget):
        tokens = choose_tokens(process_logits(logits, gen, seen), gen, rng)
        yield tokens.tolist()
        if step == budget - 1:
            return
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        column = torch.tensor([T + step], device=device)
        if own_steps:
            logits = step_logits(model, tokens[:, None], layout, column, T + step + 1)
            continue
        logits = model(
            tokens[:, None],
            position_ids_for(layout, column),
            attention_mask_for(layout, column, T + step + 1),
            cache_columns=column,
            kv_length=T + step + 1,
        ).logits[:, -1].float()


def step_logits(model, tokens: torch.Tensor, layout, columns: torch.Tensor, kv_length: int) -> torch.Tensor:
    """Float32 logits (B, V) of the last of `tokens` (B, T) run at cache `columns` (T,), for a network
    that gives its own positions and mask (`model.step_inputs`, e.g. ChatGLM2/3's 1-D positions)."""
    position_ids, mask = model.step_inputs(layout, columns, kv_length)
    cache_columns = slice(0, kv_length) if columns.shape[0] == kv_length else columns
    return model(tokens, position_ids, mask, cache_columns=cache_columns, kv_length=kv_length,
                 last_logits_only=True).logits[:, -1].float()


class TextStream:
    """Per-row text assembly: complete characters only, and stop strings cut (never partly shown)."""

    def __init__(self, tokenizer: ChatGLMTokenizer, stop_strings: Sequence[str] = ()):
        self.decoder = StreamDecoder(tokenizer)
        self.stop_strings = [s for s in stop_strings if s]
        self.text = ""  # all decoded text
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        for s in self.stop_strings:
            at = self.text.find(s)
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        limit = len(self.text)
        if not final and not self.stopped:
            # hold back a tail that might be the start of a stop string
            for s in self.stop_strings:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        limit = min(limit, len(self.text) - k)
                        break
        delta = self.text[self.emitted:limit]
        self.emitted = max(self.emitted, limit)
        return delta


def generate(
    model, tokenizer: ChatGLMTokenizer | None, prompts: Sequence[Sequence[int]], gen: GenerationConfig
) -> list[Generation]:
    """Generate for a batch of prompt ids; returns new ids (without the stop token), text and finish reason."""
    start = time.perf_counter()
    results = [Generation(token_ids=[], prompt_tokens=len(p)) for p in prompts]
    streams = [TextStream(tokenizer, gen.stop_strings) if tokenizer is not None else None for _ in prompts]
    active = [True] * len(prompts)
    first_token_time = None
    for step_tokens in stream_tokens(model, prompts, gen):
        first_token_time = first_token_time or time.perf_counter()
        for i, token in enumerate(step_tokens):
            if not active[i]:
                continue
            if token is None:
                results[i].finish_reason = "stop"
                active[i] = False
                continue
            results[i].token_ids.append(token)
            if streams[i] is not None:
                streams[i].push(token)
                if streams[i].stopped:
                    results[i].finish_reason = "stop"
                    active[i] = False
        if not any(active):
            break
    elapsed = time.perf_counter() - start
    for r, s in zip(results, streams):
        if s is not None:
            s.finish()
            r.text = s.text
        r.stats = {"seconds": elapsed, "first_token_seconds": (first_token_time or time.perf_counter()) - start}
    return results


def stream_text(model, tokenizer: ChatGLMTokenizer, prompt: Sequence[int], gen: GenerationConfig) -> Iterator[tuple[str, Generation]]:
    """Single prompt: yield (text delta, running Generation) as tokens arrive; the last item has finish_reason set."""
    result = Generation(token_ids=[], prompt_tokens=len(prompt))
    text = TextStream(tokenizer, gen.stop_strings)
    result.finish_reason = "length"
    for (token,) in stream_tokens(model, [prompt], gen):
        if token is None:
            result.finish_reason = "stop"
            break
        result.token_ids.append(token)
        delta = text.push(token)
        if text.stopped:
            result.finish_reason = "stop"
            result.text = text.text
            if delta:
                yield delta, result
            break
        result.text = text.text[: text.emitted]
        if delta:
            yield delta, result
    tail = text.finish()
    result.text = text.text
    yield tail, result
