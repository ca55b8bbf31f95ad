"""The two model calls every decode path makes over the KV cache: `prefill` and `decode_one_token`.

They are the only code that turns a batch's layout into position ids and attention masks for a
cached step; eager generation, the compiled/graphed decoder, the server engine and the benchmarks
all call them. What differs between architectures comes from the model (docs/architecture.md):

  model.prompt_layout(input_ids, left_padded=True) -> Layout  (where each row's prompt parts sit)
  model.slot_layout(state) -> Layout                           (a server slot's layout from its state)
  Layout.positions(columns) -> position ids for absolute cache columns
  Layout.mask_for(query_columns, key_length, explicit=False) -> bool (B, 1, T, S) mask (or None for a
                                                               plain causal one, unless `explicit`)

Columns are sequence columns of the row. A P-Tuning prefix (pre_seq_len cache columns filled before
the prompt and always attended, ptuning.py) shifts them: here, and only here, sequence columns become
cache columns behind the prefix, kv_length grows by it and the mask gets its columns in front, visible
to every query. Layouts, the decoders and the server never see the prefix.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Protocol

import torch

from .ptuning import prefix_length, prefix_mask


class Layout(Protocol):
    """A dataclass whose fields are (B,) tensors (so a captured step can keep them in static buffers)."""

    def positions(self, columns: torch.Tensor) -> torch.Tensor: ...

    def mask_for(self, query_columns: torch.Tensor, key_length: int, *, explicit: bool = False
                 ) -> torch.Tensor | None: ...


def static_layout(model, rows: int, device: torch.device) -> Layout:
    """A layout of `rows` rows in fresh tensors (an idle slot's values), for a captured step to read
    while `copy_layout` refills them between prompts."""
    idle = torch.tensor(model.idle_slot_state(), dtype=torch.long, device=device)
    return model.slot_layout(idle.expand(rows, -1).clone())


def copy_layout(target: Layout, source: Layout) -> None:
    """Write `source`'s tensors into `target`'s (same architecture, same rows) in place."""
    for f in fields(target):
        getattr(target, f.name).copy_(getattr(source, f.name))


def prefill(model, input_ids: torch.Tensor, layout: Layout, *, columns: torch.Tensor | None = None,
            cache_rows: torch.Tensor | None = None, prompt_mask=None, last: torch.Tensor | None = None) -> torch.Tensor:
    """Run prompts (B, T) into the cache; float32 logits (B, V) of each row's last position.

    Default: row b is cache slot b and the prompt fills columns 0..T-1 (a strided copy). With
    `columns` (B, T) and `cache_rows` (B,) each row is written to its own columns of its own slot
    (the server: left-padded rows whose prompts start at column 0). `prompt_mask` (model.PromptMask)
    stands in for the mask of one unpadded prompt ending in <sop> (flash attention).

    `last` ((1,) long) is for prompts right-padded to a fixed length (fast.py's captured prefill): the
    logits are those of column `last`, the prompt's real end, and the mask is the layout's explicit one.
    That is exact when `layout` is the unpadded prompt's: no prompt row sees a column past the prompt's
    end (ChatGLM-6B's bidirectional part ends at <sop>, or at the prompt's end without one; the rest, and
    ChatGLM2/3's mask, is causal), so the pads change nothing the prompt computes. Their cache columns
    hold junk that each decode step overwrites before its mask (key column <= its own) lets it be seen.
    """
    T = input_ids.shape[1]
    P = prefix_length(model)
    if columns is None:
        query_columns, cache_columns = torch.arange(T, device=input_ids.device), slice(P, P + T)
    else:
        query_columns, cache_columns = columns, columns + P
    if prompt_mask is not None:
        mask = replace(prompt_mask, prefix=P)
    else:
        mask = layout.mask_for(query_columns, T, explicit=last is not None)
        mask = prefix_mask(mask, P) if P else mask
    return model(
        input_ids,
        layout.positions(query_columns),
        mask,
        cache_columns=cache_columns,
        kv_length=P + T,
        cache_rows=cache_rows,
        last_logits_only=True,
        logits_at=last,
    ).logits[:, -1].float()


def decode_one_token(model, token: torch.Tensor, column: torch.Tensor, layout: Layout, kv_length: int,
                     *, cache_rows: slice | None = None) -> torch.Tensor:
    """Run `token` (B, 1) at cache `column` ((1,) shared, or (B, 1) per row), attending over the first
    `kv_length` cache columns; float32 logits (B, V). `cache_rows=slice(0, B)`: the batch is the
    cache's first B slots, used in place (the server)."""
    P = prefix_length(model)
    mask = layout.mask_for(column, kv_length)  # (B, 1, 1, S): the static-shape stand-in for slicing
    return model(
        token,
        layout.positions(column),
        prefix_mask(mask, P) if P else mask,
        cache_columns=column + P if P else column,
        kv_length=P + kv_length,
        cache_rows=cache_rows,
        last_logits_only=True,
    ).logits[:, -1].float()
