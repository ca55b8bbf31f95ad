"""Records -> token ids -> batches: masking (SPEC.md section 6), the tokenization cache, the held-out split,
length-grouped batching and collation. Reading files into Records lives in `records.py` (re-exported here).

An example is `encode(prompt)` (ending in `[gMASK] <sop>`) + `encode(target, no specials)` + `<eop>`;
labels are -100 before `<sop>` and the token ids from `<sop>` on (the model shifts them itself).
ChatGLM2-6B and ChatGLM3-6B tokenizers get their own formats (data_glm2.py, SPEC.md II.6).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .data_glm2 import encode_record, record_source, whole_conversations
from .errors import ChatGLMError, DataError
from .records import (FORMATS, TEMPLATES, DataReport, Record, build_prompt, check_template, expand_paths,
                      load_records)
from .tokenizers import tokenizer_family

__all__ = [
    "FORMATS", "TEMPLATES", "DataReport", "Record", "build_prompt", "expand_paths", "load_records", "Example",
    "encode_example", "tokenize_records", "default_cache_dir", "split_validation", "LengthGroupedBatches", "collate",
]

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
CACHE_VERSION = 2  # bump when the encoding below changes: old cache files then stop matching


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; -100 before <sop>
    prompt_length: int | None = None  # ids the model is given when it answers; None: through <sop>

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt as generation sees it (evaluation): ChatGLM-6B's ends in <sop>."""
        end = self.context_length + 1 if self.prompt_length is None else self.prompt_length
        return self.input_ids[:end]

    @property
    def context_length(self) -> int:
        """Index of <sop>: the first position with a label."""
        return next(i for i, label in enumerate(self.labels) if label != IGNORE_INDEX)


# -- encoding ---------------------------------------------------------------------------------------
def encode_example(record: Record, tokenizer, *, template: str = "chatglm", max_source_length: int = 512,
                   max_target_length: int = 512) -> Example:
    """Token ids and labels of one record (SPEC.md section 6) with both parts truncated to their limits."""
    _check_lengths(max_source_length, max_target_length)
    if tokenizer_family(tokenizer) != "chatglm":
        return encode_record(record, tokenizer, template=template, max_source_length=max_source_length,
                             max_target_length=max_target_length)
    return _encode(build_prompt(record, template), record.response, tokenizer, max_source_length, max_target_length)


def _encode(prompt: str, response: str, tokenizer, max_source_length: int, max_target_length: int) -> Example:
    source = tokenizer.encode(prompt)
    if source[-2:] != [tokenizer.gmask_token_id, tokenizer.bos_token_id]:
        raise ChatGLMError("tokenizer.encode(prompt) must end in [gMASK] <sop>; use the ChatGLM-6B tokenizer")
    # Keep the END of the source: [gMASK] <sop>, the question's end and the latest history survive.
    source = source[-max_source_length:]
    # A cut target loses its <eop> too: the model should not learn to stop in mid-answer.
    target = (tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id])[:max_target_length]
    context_length = len(source) - 1  # index of <sop>
    return _example(source + target, context_length)


def _example(input_ids: list[int], context_length: int) -> Example:
    return Example(input_ids=input_ids, labels=[IGNORE_INDEX] * context_length + input_ids[context_length:])


def _check_lengths(max_source_length: int, max_target_length: int) -> None:
    if max_source_length < 2:
        raise ChatGLMError(f"max_source_length must be at least 2 ([gMASK] <sop>), not {max_source_length}")
    if max_target_length < 1:
        raise ChatGLMError(f"max_target_length must be at least 1, not {max_target_length}")


# -- tokenization with an on-disk cache --------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "chatglm-ft" / "tokenized"


def tokenize_records(records: Sequence[Record], tokenizer, *, template: str = "chatglm", max_source_length: int = 512,
                     max_target_length: int = 512, cache_dir: str | Path | None = None) -> list[Example]:
    """encode_example for every record; with `cache_dir` the result is stored so the next run skips the tokenizer.

    The cache key covers the exact prompt/target texts, the tokenizer model file, the template and both
    length limits, so any change to one of them tokenizes afresh.
    """
    check_template(template)
    _check_lengths(max_source_length, max_target_length)
    family = tokenizer_family(tokenizer)
    if family == "chatglm3":
        count = len(records)
        records = whole_conversations(records)
        if len(records) < count:
            log.info("ChatGLM3: %d multi-turn records joined into %d whole conversations", count, len(records))
    if family == "chatglm":
        prompts = [build_prompt(r, template) for r in records]
    else:
        prompts = [record_source(r, template, family) for r in records]
    responses = [r.response for r in records]
    cache_file = None
    if cache_dir is not None:
        fingerprint = _tokenizer_fingerprint(tokenizer)
        if fingerprint is None:
            log.warning("tokenizer has no model_file: tokenization is not cached")
        else:
            content = json.dumps([CACHE_VERSION, family, fingerprint, template, max_source_length, max_target_length,
                                  prompts, responses], ensure_ascii=False)
            key = hashlib.sha256(content.encode("utf-8")).hexdigest()[:32]
            cache_file = Path(cache_dir) / f"tokens-{key}.safetensors"
            cached = _read_cache(cache_file, len(records))
            if cached is not None:
                log.info("tokenized data from cache %s (%d examples)", cache_file, len(cached))
                return cached
    start = time.perf_counter()
    if family == "chatglm":
        examples = [_encode(p, r, tokenizer, max_source_length, max_target_length) for p, r in zip(prompts, responses)]
    else:
        examples = [encode_record(r, tokenizer, template=template, max_source_length=max_source_length,
                                  max_target_length=max_target_length) for r in records]
    log.info("tokenized %d examples in %.1f s", len(examples), time.perf_counter() - start)
    if cache_file is not None:
        _write_cache(cache_file, examples)
    return examples


def _tokenizer_fingerprint(tokenizer) -> str | None:
    model_file = getattr(tokenizer, "model_file", None)
    if model_file is None:
        return None
    digest = hashlib.sha256(Path(model_file).read_bytes()).hexdigest()
    specials = [tokenizer.gmask_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    return f"{digest}:{tokenizer_family(tokenizer)}:{specials}"


def _read_cache(path: Path, count: int) -> list[Example] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:  # a damaged cache file is rebuilt, never fatal
        log.warning("ignoring unreadable token cache %s (%s)", path, e)
        return None
    if "labels" not in tensors:  # an older cache layout
        return None
    ids, labels, offsets = tensors["input_ids"].tolist(), tensors["labels"].tolist(), tensors["offsets"].tolist()
    prompt_lengths = tensors["prompt_lengths"].tolist()
    if len(prompt_lengths) != count:
        return None
    return [Example(ids[offsets[i]:offsets[i + 1]], labels[offsets[i]:offsets[i + 1]],
                    None if prompt_lengths[i] < 0 else prompt_lengths[i]) for i in range(count)]


def _write_cache(path: Path, examples: list[Example]) -> None:
    from safetensors.torch import save_file

    lengths = [len(e) for e in examples]
    tensors = {
        "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),  # all rows, flat
        "offsets": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64),  # (N + 1,)
        "labels": torch.tensor([t for e in examples for t in e.labels], dtype=torch.int32),  # all rows, flat
        "prompt_lengths": torch.tensor([-1 if e.prompt_length is None else e.prompt_length for e in examples],
                                       dtype=torch.int32),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a killed run never leaves a half-written cache behind.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"version": str(CACHE_VERSION)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- held-out split -----------------------------------------------------------------------------------
def split_validation(items: Sequence, *, val_size: float | int, seed: int) -> tuple[list, list]:
    """(train, validation), deterministic for a seed; val_size is a fraction in [0, 1) or a count.

    Records from one conversation (same `source`) go to the same side, so validation turns are never
    trained on through a sibling turn. Both parts keep the input order.
    """
    n = len(items)
    if isinstance(val_size, float) and 0 <= val_size < 1:
        wanted = max(1, round(n * val_size)) if val_size > 0 else 0
    elif isinstance(val_size, int) and not isinstance(val_size, bool) and val_size >= 0:
        wanted = val_size
    else:
        raise ChatGLMError(f"val_size must be a fraction in [0, 1) or a whole count >= 0, not {val_size!r}")
    if wanted == 0:
        return list(items), []
    if wanted >= n:
        raise ChatGLMError(f"a validation split of {wanted} leaves nothing to train on ({n} examples)")
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        source = getattr(item, "source", "") if isinstance(item, Record) else ""
        groups.setdefault(source or i, []).append(i)
    order = list(groups.values())
    np.random.default_rng(seed).shuffle(order)
    chosen: set[int] = set()
    for group in order:
        if len(chosen) >= wanted:
            break
        chosen.update(group)
    if len(chosen) >= n:
        raise ChatGLMError(f"a validation split of {wanted} leaves nothing to train on ({len(groups)} conversations)")
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]


# -- batching --------------------------------------------------------------------------------------
class LengthGroupedBatches:
    """Batches of example indices with similar lengths, so little compute goes to padding.

    Per epoch: a seeded permutation, cut into groups of `group_batches` global batches, each group
    sorted by length and cut into global batches (batch_size * num_replicas), batches shuffled, the
    one with the longest example first (an out-of-memory error shows at step 1, not hours later).
    Rank r gets the r-th slice of every global batch, so N processes see exactly the batches of one
    process with N times the batch size. Deterministic given (seed, epoch); `state_dict` holds the
    position, and iteration continues from it after `load_state_dict`.
    Without `shuffle` (evaluation): batches in order of decreasing length. With `by_length=False` the
    permutation is cut into batches as it is (random batches, as a plain shuffled data loader gives).
    """

    def __init__(self, lengths: Sequence[int], *, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0, group_batches: int = 50,
                 by_length: bool = True):
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas or group_batches < 1:
            raise ChatGLMError(f"bad batching: batch_size={batch_size}, num_replicas={num_replicas}, rank={rank}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise DataError("no examples to batch")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.num_replicas, self.rank, self.group_batches = num_replicas, rank, group_batches
        self.by_length = by_length
        self.global_batch_size = batch_size * num_replicas
        if drop_last and len(self.lengths) < self.global_batch_size:
            raise DataError(f"{len(self.lengths)} examples do not fill one batch of {self.global_batch_size}")
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        n, size = len(self.lengths), self.global_batch_size
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            return [order[i:i + size] for i in range(0, len(self) * size, size)]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n)
        if self.by_length:
            group = size * self.group_batches
            order = np.concatenate([chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                                    for chunk in (order[i:i + group] for i in range(0, n, group))])
        batches = [order[i:i + size] for i in range(0, len(self) * size, size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda i: self.lengths[batches[i]].max())
        batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of an epoch."""
        batches = []
        for batch in self.global_batches(epoch):
            if len(batch) % self.num_replicas:  # a short last batch: repeat items so every rank gets some
                batch = np.resize(batch, math.ceil(len(batch) / self.num_replicas) * self.num_replicas)
            per_rank = len(batch) // self.num_replicas
            batches.append(batch[self.rank * per_rank:(self.rank + 1) * per_rank].tolist())
        return batches

    def token_counts(self, epoch: int = 0, *, min_width: int = 0) -> tuple[int, int]:
        """(real tokens, batch positions) of this rank's batches of an epoch: their ratio is the share of the
        work that is not padding (each batch is padded to its longest example, or to `min_width` if wider)."""
        batches = self.epoch_batches(epoch)
        return (int(sum(self.lengths[b].sum() for b in batches)),
                int(sum(len(b) * max(min_width, int(self.lengths[b].max())) for b in batches)))

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch; when exhausted, the next iteration is the next epoch."""
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off; the data and global batch must be those of the saved run."""
        if "pack_length" in state:  # packing.PackedBatches' state
            raise DataError("cannot resume: the checkpoint's batches were packed; resume with --batching packed")
        mine = self._identity()
        changed = [k for k in mine if k in state and state[k] != mine[k]]
        if changed:
            raise DataError(
                f"cannot resume: {', '.join(f'{k} {state[k]} -> {mine[k]}' for k in changed)} changed since the"
                " checkpoint, so the batches would differ; use the same data, seed, global batch size and --batching"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _identity(self) -> dict[str, Any]:
        lengths_hash = hashlib.sha256(self.lengths.tobytes()).hexdigest()[:16]
        return {"seed": self.seed, "global_batch_size": self.global_batch_size, "num_examples": len(self.lengths),
                "lengths_hash": lengths_hash, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "group_batches": self.group_batches, "by_length": self.by_length}


def collate(examples: Sequence[Example], pad_id: int, *, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with `pad_id`, labels with -100 (positions after <eop> cost nothing)."""
    width = max(len(e) for e in examples)
    width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        input_ids[row, :len(example)] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :len(example)] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}
