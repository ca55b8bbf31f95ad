"""Training examples for ChatGLM2-6B and ChatGLM3-6B (SPEC.md II.6); `data.py` calls these for those tokenizers.

- ChatGLM2-6B, as THUDM's ptuning/main.py: ids = encode(prompt) (`[gMASK] sop` in front) + encode(answer) + `</s>`;
  the loss is on the answer and `</s>`. The prompt is the chat format (rounds) or the Alpaca template.
- ChatGLM3-6B, as THUDM's finetune_hf.py `process_batch`: `[gMASK] sop`, one role message per turn, `</s>`;
  every token after a token of an assistant (or observation) turn is a target, so one example teaches every
  assistant turn of a conversation, and the `<|user|>` that ends an answer as well as the final `</s>`.
"""
from __future__ import annotations

from typing import Any, Sequence

from .chat_glm2 import chatglm2_prompt
from .chat_glm3 import message_content
from .errors import ChatGLMError
from .records import Record, build_prompt

IGNORE_INDEX = -100
NO_LOSS_ROLES = ("system", "user")


def record_source(record: Record, template: str, family: str) -> Any:
    """What the model reads for a record: the prompt text (ChatGLM2) or the role messages (ChatGLM3)."""
    if family == "chatglm2":
        if template == "chatglm" and not record.templated:
            return chatglm2_prompt(record.prompt, record.history)
        return build_prompt(record, template)  # the Alpaca template, or a ready-made prompt
    if template == "chatglm" and not record.templated:
        if record.messages:
            return record.messages
        turns = list(record.history) + [(record.prompt, record.response)]
        return [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    return [{"role": "user", "content": build_prompt(record, template)},
            {"role": "assistant", "content": record.response}]


def encode_chatglm2(prompt: str, response: str, tokenizer, *, max_source_length: int, max_target_length: int):
    """ptuning/main.py's example; a long prompt keeps `[gMASK] sop` and its END (the question), as for ChatGLM-6B."""
    from .data import Example

    source = tokenizer.encode(prompt)
    if len(source) > max_source_length:
        source = source[:2] + source[len(source) - max_source_length + 2:]
    target = tokenizer.encode(response, add_special_tokens=False)[:max_target_length]
    input_ids = source + target + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(source) + target + [tokenizer.eos_token_id]
    return Example(input_ids=input_ids, labels=labels, prompt_length=len(source))


def encode_conversation(messages: Sequence[dict], tokenizer, *, max_length: int):
    """finetune_hf.py's example of a conversation, cut to max_length ids (the original's
    max_input_length + max_output_length + 1). The prompt, for evaluation, ends at the last `<|assistant|>`."""
    from .data import Example

    if not messages or messages[-1].get("role") != "assistant":
        raise ChatGLMError("a ChatGLM3 training conversation must end with an assistant message")
    input_ids, loss_mask = list(tokenizer.prefix_tokens), [False] * len(tokenizer.prefix_tokens)
    prompt_length = 0
    for message in messages:
        if message["role"] == "assistant":
            prompt_length = len(input_ids) + 1  # through this turn's <|assistant|>
        ids = tokenizer.build_single_message(message["role"], message.get("metadata", ""), message_content(message))
        input_ids += ids
        loss_mask += [message["role"] not in NO_LOSS_ROLES] * len(ids)
    input_ids.append(tokenizer.eos_token_id)
    loss_mask = [False] + loss_mask  # a token is a target when the token BEFORE it belongs to an answer
    labels = [i if mask else IGNORE_INDEX for i, mask in zip(input_ids, loss_mask)]
    return Example(input_ids=input_ids[:max_length], labels=labels[:max_length],
                   prompt_length=min(prompt_length, max_length))


def encode_record(record: Record, tokenizer, *, template: str, max_source_length: int, max_target_length: int):
    family = tokenizer.family
    source = record_source(record, template, family)
    if family == "chatglm2":
        return encode_chatglm2(source, record.response, tokenizer, max_source_length=max_source_length,
                               max_target_length=max_target_length)
    return encode_conversation(source, tokenizer, max_length=max_source_length + max_target_length + 1)


def whole_conversations(records: Sequence[Record]) -> list[Record]:
    """One record per conversation for ChatGLM3, whose examples train every assistant turn at once: of the records
    a multi-turn row became (consecutive, same source, each the previous one plus a turn) only the last stays."""
    kept: list[Record] = []
    for record in records:
        if kept and record.source and kept[-1].source == record.source and _extends(record, kept[-1]):
            kept[-1] = record
        else:
            kept.append(record)
    return kept


def _extends(record: Record, earlier: Record) -> bool:
    if record.messages or earlier.messages:
        return record.messages[:len(earlier.messages)] == earlier.messages
    return list(record.history[:len(earlier.history) + 1]) == list(earlier.history) + [(earlier.prompt,
                                                                                         earlier.response)]
