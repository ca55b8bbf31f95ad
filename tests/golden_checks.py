"""Checks of a model's numbers against a golden record (ptuning_golden.json, golden.json: what the original code
computed on the tiny checkpoints), shared by the tests of every family."""
from __future__ import annotations

import torch


def assert_logits_match_golden(logits: torch.Tensor, case: dict) -> None:
    """logits (T, V), float64, of one `forward` case against its record: the first 8 logits and the logsumexp at
    every position, the sum over the vocabulary, and the top 10 at the last position."""
    def expect(key: str) -> torch.Tensor:
        return torch.tensor(case[key], dtype=torch.float64)

    torch.testing.assert_close(logits[:, :8], expect("logits_first8_each_pos"), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.logsumexp(-1), expect("logsumexp_each_pos"), atol=1e-4, rtol=0)
    # a sum over the whole vocabulary (65,024 or 130,528 float32 logits) carries ~1e-4 rounding of its own
    torch.testing.assert_close(logits.sum(-1), expect("logits_sum_each_pos"), atol=2e-3, rtol=0)
    top = logits[-1].topk(10)
    assert top.indices.tolist() == case["last_logits_top10_ids"]
    torch.testing.assert_close(top.values, expect("last_logits_top10"), atol=1e-4, rtol=0)
