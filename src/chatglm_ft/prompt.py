"""Prompt templates and response clean-up (SPEC.md sections 5 and 6)."""
from __future__ import annotations

import re
from typing import Sequence

History = Sequence[Sequence[str]]  # [(query, response), ...]


def chat_prompt(query: str, history: History | None = None) -> str:
    """The original ChatGLM-6B chat format: the bare query without history, rounds otherwise."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca format of the original chatglm6b_ft project (and of the reference LoRA project)."""
    prompt = f"Instruction: {instruction}\n"
    if input:
        prompt += f"Input: {input}\n"
    return prompt + "Answer: "


_CJK = r"[\u4e00-\u9fff]"
_PUNCTUATION = [(",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？")]


# transformers' `clean_up_tokenization_spaces` (on by default in the versions THUDM's code runs on), which
# the original chat() applies when it decodes the reply: the same tokens must give the same text.
SPACE_CLEAN_UP = (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), \
    (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")


def clean_up_spaces(text: str) -> str:
    for before, after in SPACE_CLEAN_UP:
        text = text.replace(before, after)
    return text


def clean_response(response: str) -> str:
    """Post-processing of the original chat(): the decode's space clean-up, strip, the date placeholder,
    full-width punctuation next to CJK."""
    response = clean_up_spaces(response).strip().replace("[[训练时间]]", "2023年")
    for half, full in _PUNCTUATION:
        h = re.escape(half)
        response = re.sub(rf"({_CJK}){h}", rf"\g<1>{full}", response)
        response = re.sub(rf"{h}({_CJK})", rf"{full}\g<1>", response)
    return response
