"""Evaluate one model and its adapters on a dataset: generated answers scored with BLEU-4/ROUGE,
and the loss/perplexity of the reference answers under teacher forcing.

    model, tokenizer = load(path)
    results = evaluate(model=model, tokenizer=tokenizer, records=records,
                       variants=parse_variants(["base", "out/adapter"]))
    eval_report.write_outputs(out_dir, results, data=...)  # metrics.json, predictions.jsonl, report.md, chart.png

The base model is loaded once; each adapter is applied in turn (`lora.apply_adapters`) and
taken out again, so `base` and every adapter run on the same weights.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .errors import ChatGLMError, DataError
from .generate import Generation, GenerationConfig, generate
from .prompt import clean_response
from .tokenizer import left_pad

BASE = "base"
EVAL_MODULES = ("jieba", "nltk", "rouge_chinese", "matplotlib")  # the `eval` extra: scoring and charts
LOSS_CHUNK_TOKENS = 2048  # target positions per lm_head call: bounds the (N, vocab) float32 logits to ~1 GB


def missing_eval_modules() -> list[str]:
    """The `eval` extra's modules that are not installed (scoring needs them all)."""
    import importlib.util

    return [m for m in EVAL_MODULES if importlib.util.find_spec(m) is None]


# -- variants: the base model and its adapters ------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    adapter: Path | None = None  # None: the base model
    ptuning: bool = False  # `adapter` is a P-Tuning v2 prefix directory (ptuning.py), not a LoRA adapter


def parse_variants(values: Sequence[str] | None) -> list[Variant]:
    """`--adapter` values -> variants; "base" is the model without adapters; none given: base only.

    A value is an adapter directory (PEFT layout), a P-Tuning prefix directory (THUDM's layout), or a
    `chatglm-ft train` output directory holding one.
    """
    from .lora import adapter_dir
    from .ptuning import is_prefix_dir, prefix_dir

    if not values:
        return [Variant(BASE)]
    variants: list[Variant] = []
    names: set[str] = set()
    for value in values:
        if value == BASE:
            variant = Variant(BASE)
        else:
            given_dir = Path(value).expanduser()
            ptuning = given_dir.is_dir() and is_prefix_dir(prefix_dir(given_dir))
            path = prefix_dir(given_dir) if ptuning else adapter_dir(value)
            given = Path(value).expanduser().resolve()
            name = given.name or "adapter"
            if name in names:  # two dirs with one name (run1/adapter, run2/adapter): qualify by the parent
                name = f"{given.parent.name}/{name}"
            variant = Variant(name, path, ptuning)
        if variant.name in names:
            raise ChatGLMError(f"variant {variant.name!r} given twice")
        names.add(variant.name)
        variants.append(variant)
    return variants


def activated(model, variants: Sequence[Variant]) -> Iterator[tuple[Variant, Any]]:
    """Yield (variant, model in that state) in turn; the base model is loaded once.

    Each adapter is applied on its own with `lora.apply_adapters` (its checks and dtype handling) and
    taken out again before the next variant, so `model` is the plain base model afterwards.
    """
    from .lora import apply_adapters, remove_adapters

    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for variant in variants:
        if variant.adapter is None:
            yield variant, model
            continue
        if variant.ptuning:
            from .ptuning import detach, load_prefix

            load_prefix(model, variant.adapter)
            try:
                yield variant, model
            finally:
                detach(model)
            continue
        adapted = apply_adapters(model, variant.adapter)
        try:
            yield variant, adapted
        finally:
            remove_adapters(adapted)
            for name, p in model.named_parameters():  # apply_adapters froze the base
                p.requires_grad_(trainable.get(name, p.requires_grad))


# -- the samples ----------------------------------------------------------------------------------
@dataclass
class Sample:
    """One record ready for evaluation: prompt ids as training builds them, references, encoded examples."""
    prompt: str
    prompt_ids: list[int]
    references: list[str]
    examples: list[Any]  # data.Example per reference (teacher forcing)
    source: str = ""


def prepare_samples(records: Sequence[Any], tokenizer, *, template: str, max_source_length: int,
                    max_target_length: int) -> tuple[list[Sample], int]:
    """Samples for the records that have a reference answer; returns (samples, records skipped)."""
    from .data import build_prompt, encode_example

    samples, skipped = [], 0
    for record in records:
        references = [r for r in (getattr(record, "references", None) or [record.response]) if r and r.strip()]
        if not references:
            skipped += 1
            continue
        examples = [
            _last_answer_only(encode_example(replace(record, response=ref), tokenizer, template=template,
                                             max_source_length=max_source_length, max_target_length=max_target_length))
            for ref in references
        ]
        # The prompt as training sees it (same truncation): for ChatGLM-6B everything up to and including <sop>.
        first = examples[0]
        samples.append(Sample(prompt=build_prompt(record, template),
                              prompt_ids=list(first.prompt_ids),
                              references=references, examples=examples, source=getattr(record, "source", "") or ""))
    return samples, skipped


def _last_answer_only(example):
    """The reference loss covers the answer being evaluated: a ChatGLM3 example also trains the conversation's
    earlier answers, which are prompt here."""
    if example.prompt_length is None:
        return example
    labels = [IGNORE_INDEX] * example.prompt_length + example.labels[example.prompt_length:]
    return replace(example, labels=labels)


# -- generation -----------------------------------------------------------------------------------
def generate_answers(model, tokenizer, prompts: Sequence[Sequence[int]], *, gen: GenerationConfig, batch_size: int,
                     log=None) -> list[Generation]:
    """Batched generation, longest prompts first (less padding, and an out-of-memory shows at once)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        # every row draws with the seed's own sequence (sampling.row_seeds): an answer does not depend on its batch
        for i, result in zip(chunk, generate(model, tokenizer, [prompts[i] for i in chunk], gen)):
            results[i] = result
        if log:
            log(f"generated {min(start + batch_size, len(order))}/{len(order)}")
    return results  # type: ignore[return-value]


# -- teacher forcing ------------------------------------------------------------------------------
@torch.inference_mode()
def sequence_losses(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed shifted cross-entropy and target count per row of a left-padded batch: (B,), (B,).

    The same loss as `model(input_ids, labels=labels).loss`, kept per row; only target positions go
    through lm_head.
    """
    B, T = input_ids.shape
    layout = model.prompt_layout(input_ids)
    columns = torch.arange(T, device=input_ids.device)
    h = model.transformer(input_ids, layout.positions(columns), layout.mask_for(columns, T))
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, T-1)
    selected = h[:, :-1][keep]  # (N, H)
    goal = targets[keep]  # (N,)
    rows = torch.arange(B, device=input_ids.device)[:, None].expand_as(targets)[keep]  # (N,)
    sums = torch.zeros(B, dtype=torch.float32, device=input_ids.device)
    for at in range(0, selected.shape[0], LOSS_CHUNK_TOKENS):
        part = slice(at, at + LOSS_CHUNK_TOKENS)
        nll = F.cross_entropy(model.lm_head(selected[part]).float(), goal[part], reduction="none")
        sums.index_add_(0, rows[part], nll)
    return sums, keep.sum(dim=1)


def reference_losses(model, examples: Sequence[Any], *, batch_size: int, pad_id: int) -> list[tuple[float, int]]:
    """(summed loss, target tokens) of each example, batched by length."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    device = model.device
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids = torch.tensor(left_pad([examples[i].input_ids for i in chunk], pad_id), device=device)
        labels = torch.tensor(left_pad([examples[i].labels for i in chunk], IGNORE_INDEX), device=device)
        sums, counts = sequence_losses(model, ids, labels)
        for i, s, c in zip(chunk, sums.tolist(), counts.tolist()):
            out[i] = (s, int(c))
    return out


# -- one variant, end to end ----------------------------------------------------------------------
@dataclass
class VariantResult:
    name: str
    adapter: str | None
    summary: dict  # samples, loss, perplexity, generation speed; after scoring word/char text metrics
    rows: list[dict] = field(default_factory=list)  # per sample: prompt, references, prediction, (scores)

    @property
    def scored(self) -> bool:
        return "word" in self.summary


def score_variant(result: VariantResult, *, workers: int | None = None) -> VariantResult:
    """Add BLEU/ROUGE to `result` (summary and rows), from its predictions and references.

    Separate from generation: the metric libraries (the `eval` extra) are imported only here, and a
    run saved without them (`write_outputs` of unscored results) can be scored later (`read_outputs`).
    """
    from .metrics import score_corpus

    per_sample, text_summary = score_corpus([r["prediction"] for r in result.rows],
                                            [r["references"] for r in result.rows], workers=workers)
    for row, scores in zip(result.rows, per_sample):
        row.update(scores)
    result.summary.update(text_summary)
    return result


def evaluate_variant(model, tokenizer, samples: Sequence[Sample], *, name: str, adapter: str | None,
                     template: str, gen: GenerationConfig, batch_size: int, log=None) -> VariantResult:
    """Generate answers and measure reference losses (not scored yet: see score_variant)."""
    from .chat_format import chat_format_for

    fmt = chat_format_for(tokenizer)
    if gen.stop_token_ids is None:  # the family's stop ids (ChatGLM3 also stops at <|user|>, <|observation|>)
        gen = replace(gen, stop_token_ids=fmt.stop_token_ids)
    start = time.perf_counter()
    generations = generate_answers(model, tokenizer, [s.prompt_ids for s in samples], gen=gen,
                                   batch_size=batch_size, log=log)
    gen_seconds = time.perf_counter() - start
    # The chat template's answers get the original chat()'s clean-up; other templates are only stripped.
    clean = fmt.clean if fmt.family != "chatglm" else clean_response
    predictions = [clean(g.text) if template == "chatglm" else g.text.strip() for g in generations]

    start = time.perf_counter()
    flat = [(k, e) for k, s in enumerate(samples) for e in s.examples]
    losses = reference_losses(model, [e for _, e in flat], batch_size=batch_size, pad_id=tokenizer.pad_token_id)
    loss_seconds = time.perf_counter() - start
    sample_loss = [[0.0, 0] for _ in samples]
    for (k, _), (s, c) in zip(flat, losses):
        sample_loss[k][0] += s
        sample_loss[k][1] += c

    loss_sum = math.fsum(s for s, _ in sample_loss)
    tokens = sum(c for _, c in sample_loss)
    mean_loss = loss_sum / tokens if tokens else float("nan")
    new_tokens = sum(len(g.token_ids) for g in generations)
    summary = {
        "samples": len(samples),
        "loss": mean_loss,
        "perplexity": math.exp(mean_loss) if tokens else float("nan"),
        "reference_tokens": tokens,
        "generation": {
            "seconds": gen_seconds,
            "new_tokens": new_tokens,
            "tokens_per_second": new_tokens / gen_seconds if gen_seconds > 0 else None,
            "prompts_per_second": len(samples) / gen_seconds if gen_seconds > 0 else None,
            "stopped": sum(g.finish_reason == "stop" for g in generations),
        },
        "loss_seconds": loss_seconds,
    }
    rows = []
    for k, (sample, gen_result, prediction) in enumerate(zip(samples, generations, predictions)):
        s, c = sample_loss[k]
        rows.append({
            "variant": name, "index": k, "source": sample.source, "prompt": sample.prompt,
            "references": sample.references, "prediction": prediction, "finish_reason": gen_result.finish_reason,
            "new_tokens": len(gen_result.token_ids), "loss": s / c if c else None,
        })
    return VariantResult(name=name, adapter=adapter, summary=summary, rows=rows)


def evaluate(
    *,
    model,
    tokenizer,
    records: Sequence[Any],
    variants: Sequence[Variant] = (Variant(BASE),),
    template: str = "chatglm",
    gen: GenerationConfig = GenerationConfig(max_new_tokens=256),
    batch_size: int = 16,
    max_source_length: int = 512,
    max_target_length: int = 512,
    workers: int | None = None,
    progress: bool = True,
    score: bool = True,
) -> tuple[list[VariantResult], int]:
    """Evaluate every variant on `records`; returns (results in variant order, records without a reference).

    score=False skips BLEU/ROUGE (no metric libraries needed): score later with `score_variant`.
    """
    samples, skipped = prepare_samples(records, tokenizer, template=template, max_source_length=max_source_length,
                                       max_target_length=max_target_length)
    if not samples:
        raise DataError("no record with a reference answer to evaluate against")
    was_training = model.training
    model.eval()
    results = []
    for variant, active in activated(model, variants):
        log = (lambda msg, v=variant.name: print(f"[eval {v}] {msg}", file=sys.stderr, flush=True)) if progress else None
        result = evaluate_variant(active, tokenizer, samples, name=variant.name,
                                  adapter=str(variant.adapter) if variant.adapter else None, template=template,
                                  gen=gen, batch_size=batch_size, log=log)
        results.append(result)
    model.train(was_training)
    model.clear_caches()
    for result in results if score else ():  # CPU work: after the model is done with the device
        score_variant(result, workers=workers)
    if progress:
        for result in results:
            s = result.summary
            text = (f"BLEU-4 {s['word']['bleu-4']:.2f}  ROUGE-1 {s['word']['rouge-1']:.2f}  ROUGE-2 "
                    f"{s['word']['rouge-2']:.2f}  ROUGE-L {s['word']['rouge-l']:.2f}  " if result.scored else "")
            print(f"[eval {result.name}] {text}perplexity {s['perplexity']:.2f}", file=sys.stderr, flush=True)
    return results, skipped
