"""Packed batches (`chatglm-ft train --batching packed`): several examples side by side in one row, each
still on its own.

A packed row is `example example ... pad*`. Every column carries the layout of its own example (the
fields of `positions.PrefixLayout` / `model_glm2.PaddingLayout`, one value per column instead of per
row), so each example gets the positions it has alone and attends only to itself: ChatGLM-6B's
prefix LM (its context bidirectional, causal from <sop>, 2-D positions) and ChatGLM2/3's causal
attention with 1-D positions from 0. The first label of every example is -100: it would be the target
of the previous example's last token, and alone that token has no target. So a row's summed loss is
the sum of its examples' losses (tests/test_packing.py checks it on the tiny checkpoints).

Rows are made once per run, from the seed: the examples are shuffled, cut into groups and each group
is packed first-fit decreasing into rows of at most `pack_length` tokens (an example longer than that
gets a row of its own). Each epoch then deals the rows into batches exactly as examples are dealt
(`data.LengthGroupedBatches` over rows): shuffled, grouped by how full they are, one slice per process.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .data import IGNORE_INDEX, Example, LengthGroupedBatches, collate
from .errors import ChatGLMError, DataError

PACK_GROUP = 4096  # examples packed together: rows come out ~99.7% full on Alpaca, and still mix the data set
PACK_STREAM = 0x7061636B  # the packing's own random stream beside the epochs' [seed, epoch] streams


def pack_rows(lengths: Sequence[int], pack_length: int, *, seed: int, group_size: int = PACK_GROUP) -> list[np.ndarray]:
    """Example indices of each packed row; every example in exactly one row, rows in a seeded order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.random.default_rng([seed, PACK_STREAM]).permutation(len(lengths))
    rows: list[np.ndarray] = []
    for first in range(0, len(order), group_size):
        group = order[first:first + group_size]
        group = group[np.argsort(-lengths[group], kind="stable")]  # longest first: the short ones fill the gaps
        room = np.zeros(0, dtype=np.int64)  # free tokens of each open row
        members: list[list[int]] = []
        for i in group:
            fits = np.flatnonzero(room >= lengths[i])
            if fits.size:
                room[fits[0]] -= lengths[i]
                members[fits[0]].append(int(i))
            else:
                room = np.append(room, pack_length - lengths[i])
                members.append([int(i)])
        rows.extend(np.asarray(m, dtype=np.int64) for m in members)
    return rows


class PackedBatches:
    """Batches of packed rows: each batch is a list of rows, each row a list of example indices.

    The same interface as `data.LengthGroupedBatches` (len, iteration, epoch/position, state_dict), so the
    training loop, resume and DDP treat both alike; `batch_size` counts rows.
    """

    def __init__(self, lengths: Sequence[int], *, pack_length: int, batch_size: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, group_size: int = PACK_GROUP):
        if pack_length < 1:
            raise ChatGLMError(f"pack_length must be at least 1, not {pack_length}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise DataError("no examples to batch")
        self.pack_length, self.group_size = pack_length, group_size
        self.rows = pack_rows(self.lengths, pack_length, seed=seed, group_size=group_size)
        self.row_batches = LengthGroupedBatches([int(self.lengths[r].sum()) for r in self.rows], batch_size=batch_size,
                                                seed=seed, num_replicas=num_replicas, rank=rank)

    # the data position lives in the row batcher
    @property
    def epoch(self) -> int:
        return self.row_batches.epoch

    @property
    def position(self) -> int:
        return self.row_batches.position

    def __len__(self) -> int:
        return len(self.row_batches)

    def epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        return [[self.rows[i].tolist() for i in batch] for batch in self.row_batches.epoch_batches(epoch)]

    def __iter__(self) -> Iterator[list[list[int]]]:
        for batch in self.row_batches:
            yield [self.rows[i].tolist() for i in batch]

    def token_counts(self, epoch: int = 0) -> tuple[int, int]:
        """(real tokens, batch positions) of this rank's batches of an epoch: each batch is pack_length wide, or
        as wide as a longer row (collate_packed's width)."""
        return self.row_batches.token_counts(epoch, min_width=self.pack_length)

    def state_dict(self) -> dict[str, Any]:
        return {**self.row_batches.state_dict(), **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "pack_length" not in state:
            raise DataError("cannot resume: the checkpoint's batches were not packed; resume with its --batching")
        mine = self._identity()
        changed = [k for k in mine if state.get(k) != mine[k]]
        if changed:
            raise DataError(
                f"cannot resume: {', '.join(f'{k} {state.get(k)} -> {mine[k]}' for k in changed)} changed since the"
                " checkpoint, so the rows would differ; use the same data, seed and --pack-length"
            )
        self.row_batches.load_state_dict({k: v for k, v in state.items() if k not in mine})

    def _identity(self) -> dict[str, Any]:
        return {"pack_length": self.pack_length, "pack_group": self.group_size, "packed_examples": len(self.lengths),
                "packed_lengths_hash": hashlib.sha256(self.lengths.tobytes()).hexdigest()[:16]}


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int, layout_of: Callable[..., Any], *,
                   device: torch.device | str | None = None, width: int = 0) -> dict[str, torch.Tensor]:
    """A batch of packed rows: input_ids and labels (R, T), position_ids ((R, 2, T) or (R, T)) and the bool
    attention_mask (R, 1, T, T) that keeps every example to itself (None where plain causal attention is the
    same: ChatGLM2/3 rows of one example each).

    `layout_of` is the model's `prompt_layout` (ChatGLM-6B or ChatGLM2/3): it is asked once for all the
    examples of the batch as unpadded rows, and its answer is spread over each example's columns. Positions
    and mask are built on `device` (the mask of 4 rows of 1024 takes tens of ms on a CPU, microseconds on a GPU).

    Rows are padded to `width` columns, or to the longest row where that is longer. `train` passes the pack length,
    so every step has one shape: a new length costs GPU libraries new plans (cuDNN attention builds a graph per
    shape), and rows packed to 1020-1024 tokens would otherwise bring one every few steps.
    """
    width = max(width, *(sum(len(e) for e in row) for row in rows))
    segments: list[Example] = []  # the examples, and each row's padding as one more sequence
    row_of: list[int] = []
    for r, row in enumerate(rows):
        segments.extend(row)
        row_of.extend([r] * len(row))
        tail = width - sum(len(e) for e in row)
        if tail:
            segments.append(Example([pad_id] * tail, [IGNORE_INDEX] * tail))
            row_of.append(r)
    alone = collate(segments, pad_id)  # (N, L): each sequence as an unpadded row from column 0
    layout = layout_of(alone["input_ids"], left_padded=False)
    seq_lengths = torch.tensor([len(e) for e in segments])  # (N,)
    offsets = torch.zeros_like(seq_lengths)  # first column of each sequence in its packed row
    for n in range(1, len(segments)):
        if row_of[n] == row_of[n - 1]:
            offsets[n] = offsets[n - 1] + seq_lengths[n - 1]
    # a sequence's layout fields, capped at its own length (a ChatGLM-6B row without <sop> is all context:
    # its context must end with it, not reach into the next example), moved to its place in the row
    fields = {f.name: (torch.minimum(getattr(layout, f.name).clamp(min=0), seq_lengths) + offsets)
              .repeat_interleave(seq_lengths).view(len(rows), width) for f in dataclasses.fields(layout)}
    packed = type(layout)(**{name: field.to(device) for name, field in fields.items()})  # every field (R, T): per column
    columns = torch.arange(width, device=device)
    labels = alone["labels"].clone()
    labels[:, 0] = IGNORE_INDEX  # no target across a boundary: alone, the first token is never a target either
    keep = torch.arange(alone["input_ids"].shape[1])[None, :] < seq_lengths[:, None]  # (N, L) real columns
    return {"input_ids": alone["input_ids"][keep].view(len(rows), width),
            "labels": labels[keep].view(len(rows), width),
            "position_ids": packed.positions(columns),
            "attention_mask": packed.mask_for(columns, width)}
