"""ChatGLM2-6B's chat format (SPEC.md II.5.1): 1-based rounds with blank lines, a full-width colon after 问/答."""
from __future__ import annotations

from typing import Sequence

from .chat_format import ChatFormat

History = Sequence[Sequence[str]]  # [(query, response), ...]


def chatglm2_prompt(query: str, history: History | None = None) -> str:
    """`[Round 1]\\n\\n问：q\\n\\n答：a\\n\\n` per past turn, then the open round; also with no history."""
    history = history or []
    rounds = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, start=1))
    return rounds + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


def chatglm2_clean(output: str) -> str:
    """The original's response clean-up: strip and fill the date placeholder (no punctuation rewriting)."""
    return output.strip().replace("[[训练时间]]", "2023年")


class ChatGLM2Format(ChatFormat):
    family = "chatglm2"
    display_name = "ChatGLM2-6B"
    max_length = 8192
    top_p = 0.8
    temperature = 0.8

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.tokenizer.eos_token_id,)  # 2

    def prompt_text(self, query: str, history: History | None = None) -> str:
        return chatglm2_prompt(query, history)

    def clean(self, output: str) -> str:
        return chatglm2_clean(output)
