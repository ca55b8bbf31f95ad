"""GLM prefix-LM positions and attention masks (SPEC.md section 3).

A prompt is `text [gMASK] <sop>`; with left padding a row is `pad* text [gMASK] <sop> generated*`.
All indices here are absolute columns of the (padded) batch:
  start    first non-pad column (the row's own index 0)
  context  column of <sop>: columns start..context-1 see each other bidirectionally
  mask     column of [gMASK] (or [MASK]): every position from <sop> on carries it as its first coordinate
Each is (B,) for one sequence per row, or (B, T) per column for rows that pack several sequences side by
side (packing.py): a column then carries the start, <sop> and [gMASK] columns of its own sequence, and the
same formulas give each sequence its own positions and a mask that keeps it to itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ChatGLMConfig


@dataclass
class PrefixLayout:
    """Where each row's prompt parts sit: ChatGLM-6B's answer to `steps.Layout` (docs/architecture.md)."""

    start: torch.Tensor  # (B,) long, or (B, T) per column (packed rows)
    context: torch.Tensor  # (B,) long, column of <sop>
    mask: torch.Tensor  # (B,) long, column of [gMASK]/[MASK]

    # What a server cache slot keeps of its prompt (the prompt starts at column 0 of a slot).
    STATE_SIZE = 2  # <sop> and [gMASK] columns
    IDLE_STATE = (1, 0)  # of a slot that holds no request: it only writes the scratch column

    def positions(self, columns: torch.Tensor) -> torch.Tensor:
        return position_ids_for(self, columns)

    def mask_for(self, query_columns: torch.Tensor, key_length: int, *, explicit: bool = False) -> torch.Tensor:
        return attention_mask_for(self, query_columns, key_length)  # always the tensor (`explicit` or not)

    def slot_state(self) -> torch.Tensor:
        """(B, STATE_SIZE) long: the row's layout as a slot keeps it (start must be 0)."""
        return torch.stack([self.context, self.mask], dim=1)

    @classmethod
    def of_slots(cls, state: torch.Tensor) -> "PrefixLayout":
        """The layout of cache slots from their (B, STATE_SIZE) state; prompts start at column 0."""
        return cls(start=torch.zeros_like(state[:, 0]), context=state[:, 0], mask=state[:, 1])


def _first_index(hit: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """Column of the first True per row of a (B, T) bool tensor, `default` where there is none."""
    T = hit.shape[1]
    cols = torch.arange(T, device=hit.device).expand_as(hit)
    first = torch.where(hit, cols, torch.full_like(cols, T)).min(dim=1).values
    return torch.where(first < T, first, default)


def prefix_layout(input_ids: torch.Tensor, config: ChatGLMConfig, *, left_padded: bool = True) -> PrefixLayout:
    """Find start, <sop> and [gMASK] columns of each row of a (B, T) batch."""
    B, T = input_ids.shape
    if left_padded:
        start = _first_index(input_ids != config.pad_token_id, torch.full((B,), T - 1, device=input_ids.device))
    else:
        start = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    cols = torch.arange(T, device=input_ids.device)
    in_row = cols[None, :] >= start[:, None]
    # A row without <sop> is all context (bidirectional), as for a bare encoder input.
    context = _first_index((input_ids == config.bos_token_id) & in_row, torch.full((B,), T, device=input_ids.device))
    gmask = _first_index((input_ids == config.gmask_token_id) & in_row, torch.full((B,), -1, device=input_ids.device))
    mask_ = _first_index((input_ids == config.mask_token_id) & in_row, torch.full((B,), -1, device=input_ids.device))
    # [gMASK] wins when present (as in the original); otherwise [MASK]; otherwise the token before <sop>.
    mask = torch.where(gmask >= 0, gmask, torch.where(mask_ >= 0, mask_, (context - 1).clamp(min=0)))
    return PrefixLayout(start=start, context=context, mask=mask)


def position_ids_for(layout: PrefixLayout, columns: torch.Tensor) -> torch.Tensor:
    """2D position ids (B, 2, T) for absolute `columns` (T,) or (B, T) of each row."""
    if columns.dim() == 1:
        columns = columns[None, :].expand(layout.start.shape[0], -1)
    start, context, mask = (per_column(x) for x in (layout.start, layout.context, layout.mask))
    generated = columns >= context
    positions = torch.where(generated, mask - start, columns - start).clamp(min=0)
    block_positions = torch.where(generated, columns - context + 1, torch.zeros_like(columns))
    return torch.stack([positions, block_positions], dim=1)  # (B, 2, T)


def attention_mask_for(layout: PrefixLayout, query_columns: torch.Tensor, key_length: int) -> torch.Tensor:
    """Bool mask (B, 1, T, S), True where query column i may attend to key column j.

    j is visible iff it is not padding and (j < context or j <= i). Padding queries see
    themselves only, so no softmax row is empty (an empty row gives NaN that would poison
    the cache through 0 * NaN).
    """
    if query_columns.dim() == 1:
        query_columns = query_columns[None, :].expand(layout.start.shape[0], -1)
    i = query_columns[:, None, :, None]  # (B, 1, T, 1)
    j = torch.arange(key_length, device=query_columns.device)[None, None, None, :]  # (1, 1, 1, S)
    start, context = per_query(layout.start), per_query(layout.context)
    visible = (j >= start) & ((j < context) | (j <= i))
    return visible | (j == i)


def per_column(field: torch.Tensor) -> torch.Tensor:
    """A layout field against (B, T) columns: (B,) per row -> (B, 1); (B, T) per column as it is."""
    return field[:, None] if field.dim() == 1 else field


def per_query(field: torch.Tensor) -> torch.Tensor:
    """A layout field against a (B, 1, T, S) mask: (B,) -> (B, 1, 1, 1); (B, T) per query column -> (B, 1, T, 1)."""
    return field[:, None, None, None] if field.dim() == 1 else field[:, None, :, None]
