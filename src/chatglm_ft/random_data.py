"""Random token sequences shaped like tokenized instruction data, for benchmarks that need neither a
tokenizer nor a dataset (the weights' counterpart is `bench.random_model`).

Every example is exactly `seq_len` tokens, so batches carry no padding and tokens/s counts real work:
    ChatGLM-6B:   prompt (prompt_tokens) + [gMASK] <sop> + answer + <eop>, labels -100 up to <sop> (SPEC.md section 6)
    ChatGLM2/3:   [gMASK] sop + prompt (prompt_tokens) + answer + </s>, labels on the answer and </s> (SPEC.md II.6)
"""
from __future__ import annotations

import torch

from .config import ChatGLMConfig
from .config_glm2 import ChatGLM2Config
from .data import IGNORE_INDEX, Example

HIGHEST_ID = 130000  # below the special tokens (130001 [gMASK], 130004 <sop>, 130005 <eop>)
# ChatGLM2/3: every prompt starts with `[gMASK] sop` (SPEC.md II.4); text pieces are the ids below 64789
GLM2_PREFIX = (64790, 64792)
GLM2_HIGHEST_ID = 64789


def random_examples(n: int, *, config: ChatGLMConfig | ChatGLM2Config, seq_len: int = 1024, prompt_tokens: int = 62,
                    seed: int = 1) -> list[Example]:
    """n examples of exactly `seq_len` tokens with uniformly random ids; the same for the same seed."""
    answer_tokens = seq_len - prompt_tokens - 3  # [gMASK], <sop>, <eop> (ChatGLM2/3: [gMASK], sop, </s>)
    if prompt_tokens < 0 or answer_tokens < 0:
        raise ValueError(f"seq_len {seq_len} cannot hold {prompt_tokens} prompt tokens and 3 special tokens")
    glm1 = isinstance(config, ChatGLMConfig)
    high = min(HIGHEST_ID if glm1 else GLM2_HIGHEST_ID, config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(20, high, (prompt_tokens,), generator=gen).tolist()
        answer = torch.randint(20, high, (answer_tokens,), generator=gen).tolist()
        if glm1:
            ids = prompt + [config.gmask_token_id, config.bos_token_id] + answer + [config.eos_token_id]
            context = prompt_tokens + 1  # index of <sop>: the first labelled position
            out.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * context + ids[context:]))
        else:
            ids = list(GLM2_PREFIX) + prompt + answer + [config.eos_token_id]
            source = len(GLM2_PREFIX) + prompt_tokens  # as encode_chatglm2: the loss is on the answer and </s>
            out.append(Example(input_ids=ids, labels=[IGNORE_INDEX] * source + ids[source:], prompt_length=source))
    return out
