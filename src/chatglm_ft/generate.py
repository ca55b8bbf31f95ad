"""Generation: prefill + decode as an iterator shared by chat, generate, serve and eval.

One step yields one new token per row; rows stop independently (at <eop>, a stop string or
their length budget). Tokens are chosen by sampling.py (the one sampler of every decode path)
and the model is called through steps.py (the one place that builds positions and masks).
"""
from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .errors import ChatGLMError, PromptTooLongError
from .fast import FastOptions, decoder_for, fast_options, prompt_mask_for
from .generation_config import GenerationConfig
from .model import PromptMask
from .sampling import NAN_GUARD_TOKEN_ID, RowSettings, choose, guarded_scores, kept_probs, mark_seen, row_seeds  # noqa: F401
from .steps import decode_one_token, prefill
from .tokenizer import ChatGLMTokenizer, StreamDecoder, left_pad

__all__ = ["GenerationConfig", "Generation", "generate", "stream_text", "stream_tokens", "process_logits", "TextStream"]


@dataclass
class Generation:
    token_ids: list[int]
    text: str = ""
    finish_reason: str = "length"  # "stop" (eop or stop string) or "length"
    prompt_tokens: int = 0
    stats: dict = field(default_factory=dict)


def process_logits(logits: torch.Tensor, gen: GenerationConfig, seen: torch.Tensor | None) -> torch.Tensor:
    """(B, V) float32 logits -> the scores the sampler draws from, in vocabulary order: penalised and
    guarded; for sampling also divided by the temperature, with the tokens top-k/top-p/min-p drop at -inf.
    (sampling.choose works on sorted probabilities directly; this view is for inspection and tests.)"""
    gen = gen.validate()
    rows = RowSettings.of([gen] * logits.shape[0], [0] * logits.shape[0], logits.device)
    scores = guarded_scores(logits, seen if gen.repetition_penalty != 1.0 else None, rows.penalty)
    if not gen.do_sample:
        return scores
    probs, order = kept_probs(scores, rows.temperature, rows.top_k, rows.top_p, rows.min_p)
    dropped = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, probs == 0)
    return (scores / rows.temperature[:, None]).masked_fill(dropped, float("-inf"))


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
    picks the decode loop: None (default) the compiled, CUDA-graphed one of fast.py on CUDA and
    the eager one on the CPU; True or False force it; FastOptions choose it exactly.
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
    options = fast_options(model, fast)
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
    layout = model.prompt_layout(input_ids)
    model.setup_caches(B, T + budget)
    rows = RowSettings.of([gen] * B, row_seeds(gen, B), device)
    seen = None
    if rows.any_penalty:
        seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=device)
        mark_seen(seen, input_ids, input_ids != config.pad_token_id)

    logits = prefill(model, input_ids, layout, prompt_mask=prompt_mask)
    for step in range(budget):
        tokens = choose(logits, rows, torch.full((B,), step, dtype=torch.long, device=device), seen)
        yield tokens.tolist()
        if step == budget - 1:
            return
        if seen is not None:
            mark_seen(seen, tokens[:, None])
        column = torch.tensor([T + step], device=device)
        logits = decode_one_token(model, tokens[:, None], column, layout, T + step + 1)


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
