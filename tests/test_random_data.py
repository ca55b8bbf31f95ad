"""random_data.random_examples: the benchmarks' stand-in for tokenized instruction data."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from chatglm_ft.config import ChatGLMConfig
from chatglm_ft.random_data import random_examples


def test_examples_have_exactly_seq_len_tokens_and_the_training_layout():
    config = ChatGLMConfig.tiny()
    examples = random_examples(3, config=config, seq_len=64, prompt_tokens=8)
    for e in examples:
        assert len(e.input_ids) == len(e.labels) == 64
        assert e.input_ids[8:10] == [config.gmask_token_id, config.bos_token_id]
        assert e.input_ids[-1] == config.eos_token_id
        assert e.context_length == 9  # labels start at <sop>
        assert e.labels[:9] == [-100] * 9 and e.labels[9:] == e.input_ids[9:]
        assert all(20 <= t < 130000 for t in e.input_ids[:8] + e.input_ids[10:-1])
    assert len({tuple(e.input_ids) for e in examples}) == 3


def test_same_seed_same_data_as_the_original_train_bench():
    """The sequences gpu/train_bench.py measured before the helper moved here (seed 1, 1024 tokens, 62 prompt)."""
    examples = random_examples(4, config=ChatGLMConfig.full())
    digest = hashlib.sha256(json.dumps([[e.input_ids, e.labels] for e in examples]).encode()).hexdigest()
    assert digest == "ca1afa4fc2dcdf5d64feeb6d71211075aa3a17ef6128f1174d42ca14a787bcf4"
    assert random_examples(4, config=ChatGLMConfig.full(), seed=2)[0].input_ids != examples[0].input_ids


def test_too_short_a_sequence_is_an_error():
    with pytest.raises(ValueError, match="cannot hold"):
        random_examples(1, config=ChatGLMConfig.tiny(), seq_len=10, prompt_tokens=8)


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_chatglm2_3_examples_start_with_gmask_sop_and_train_on_the_answer(family, shared):
    """The layout encode_chatglm2 gives a real ChatGLM2/3 tokenizer's ids: `[gMASK] sop` first, text pieces
    only, the loss on the answer and </s>; the rows run through the model with a finite loss."""
    from chatglm_ft.api import build_model
    from chatglm_ft.config_glm2 import ChatGLM2Config
    from chatglm_ft.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(shared / "golden" / f"{family}-6b-tiny")
    config = ChatGLM2Config.tiny(family=family)
    examples = random_examples(2, config=config, seq_len=48, prompt_tokens=8)
    for e in examples:
        assert len(e.input_ids) == len(e.labels) == 48
        assert e.input_ids[:2] == tokenizer.prefix_tokens
        assert e.input_ids[-1] == tokenizer.eos_token_id
        assert all(20 <= t < tokenizer.num_pieces for t in e.input_ids[2:-1])  # no special id inside
        assert e.prompt_ids == e.input_ids[:10] and e.labels[:10] == [-100] * 10 and e.labels[10:] == e.input_ids[10:]
    model = build_model(config, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        loss = model(torch.tensor([e.input_ids for e in examples]), labels=torch.tensor([e.labels for e in examples]),
                     return_logits=False).loss
    assert torch.isfinite(loss)
