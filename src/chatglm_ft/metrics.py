"""Text-overlap metrics for generated answers: BLEU-4 (nltk) and ROUGE-1/2/L F1 (rouge-chinese).

Scoring follows the official ChatGLM-6B evaluation (ptuning/main.py): nltk `sentence_bleu` with
`SmoothingFunction().method3`, and rouge-chinese's `Rouge` F1 over space-joined tokens. Two views
of the same texts are scored, because Chinese has no natural word boundaries:
  word  Chinese: jieba segmentation; English: whitespace words
  char  Chinese: characters (the official script scores BLEU-4 this way); English: whitespace words
The language of a record comes from its references (CJK share of the characters), so a
mixed dataset is scored per record. Scores are percentages (0-100) as in the official script.

Several references: BLEU counts n-grams against all of them natively; ROUGE takes, per metric,
the best F1 over the references.
"""
from __future__ import annotations

import logging
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Sequence

import jieba
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu
from rouge_chinese import Rouge

jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter is not ours to print

VIEWS = ("word", "char")
TEXT_METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_SMOOTHING = SmoothingFunction().method3
_ROUGE = Rouge()  # defaults: rouge-1/2/l with unique n-grams, as the official evaluation uses it
PARALLEL_MIN_SAMPLES = 64  # below this, starting worker processes costs more than it saves


def language(text: str) -> str:
    """"zh" when at least a fifth of the non-space characters are CJK ideographs, else "en"."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return "en"
    cjk = sum(1 for c in chars if _CJK.match(c))
    return "zh" if cjk * 5 >= len(chars) else "en"


def segment(text: str, *, view: str, lang: str) -> list[str]:
    """Tokens of `text` for one view; whitespace never counts as a token."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; use one of {VIEWS}")
    if lang != "zh":
        return text.split()
    if view == "char":
        return [c for c in text if not c.isspace()]
    return [w for w in jieba.cut(text) if w.strip()]


def sentence_bleu4(references: Sequence[Sequence[str]], hypothesis: Sequence[str]) -> float:
    """Smoothed sentence BLEU-4 (x100) of one tokenized hypothesis against one or more references."""
    references = [list(r) for r in references if r]
    if not references or not hypothesis:
        return 0.0
    return 100.0 * sentence_bleu(references, list(hypothesis), smoothing_function=_SMOOTHING)


def corpus_bleu4(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (x100): n-gram counts pooled over all samples, same smoothing (sacrebleu's default "exp")."""
    pairs = [([list(r) for r in refs if r], list(h)) for refs, h in zip(references, hypotheses)]
    pairs = [(refs, h) for refs, h in pairs if refs]
    if not pairs or not any(h for _, h in pairs):
        return 0.0
    refs, hyps = zip(*pairs)
    return 100.0 * corpus_bleu(list(refs), list(hyps), smoothing_function=_SMOOTHING)


def rouge_f1(references: Sequence[Sequence[str]], hypothesis: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 (x100), the best over the references for each metric; 0 for an empty hypothesis."""
    best = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    if not hypothesis:
        return best
    hyp = " ".join(hypothesis)
    for ref in references:
        if not ref:
            continue
        scores = _ROUGE.get_scores(hyp, " ".join(ref))[0]
        for name in best:
            best[name] = max(best[name], 100.0 * scores[name]["f"])
    return best


def _score_one(prediction: str, references: Sequence[str]) -> tuple[dict, dict[str, tuple[list, list]]]:
    """Scores of one sample plus its tokens per view (for corpus BLEU)."""
    lang = language(" ".join(references) or prediction)
    # exact tasks (the demo's translations): 100 when the answer equals a reference, ignoring outer whitespace
    scores: dict = {"lang": lang, "exact-match": 100.0 * any(prediction.strip() == r.strip() for r in references)}
    tokens = {}
    for view in VIEWS:
        hyp = segment(prediction, view=view, lang=lang)
        refs = [segment(r, view=view, lang=lang) for r in references]
        scores[view] = {"bleu-4": sentence_bleu4(refs, hyp), **rouge_f1(refs, hyp)}
        tokens[view] = (refs, hyp)
    return scores, tokens


def score_sample(prediction: str, references: Sequence[str]) -> dict:
    """{"lang", "exact-match", "word": {bleu-4, rouge-1, rouge-2, rouge-l}, "char": {...}} for one prediction."""
    return _score_one(prediction, references)[0]


def _score_star(args: tuple[str, Sequence[str]]):
    return _score_one(*args)


def score_corpus(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, workers: int | None = None
) -> tuple[list[dict], dict]:
    """Per-sample scores and the summary: exact match (%), and per view mean sentence BLEU-4, corpus BLEU-4,
    mean ROUGE F1s.

    ROUGE-L is a pure-Python O(n*m) LCS, so large sets are scored in worker processes
    (`workers`, default: up to 8 CPUs; 1 = in this process).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    jobs = [(p, list(r)) for p, r in zip(predictions, references)]
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers > 1 and len(jobs) >= PARALLEL_MIN_SAMPLES:
        # spawn, not fork: the caller may hold CUDA state, which a forked child must not touch
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_score_star, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        results = [_score_one(p, r) for p, r in jobs]
    per_sample = [s for s, _ in results]
    summary: dict = {"samples": len(per_sample), "exact-match": mean([s["exact-match"] for s in per_sample])}
    for view in VIEWS:
        view_summary = {m: mean([s[view][m] for s in per_sample]) for m in TEXT_METRICS}
        view_summary["corpus-bleu-4"] = corpus_bleu4([t[view][0] for _, t in results], [t[view][1] for _, t in results])
        summary[view] = view_summary
    return per_sample, summary


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0
