"""One chat format per model family behind one interface, so the chat CLI, `chat()`, the server and evaluation
never ask which model they hold.

A `ChatFormat` builds prompt ids from (query, history), names the ids that end an answer, turns the generated
text into (response, new history) the way THUDM's `chat()` does, and gives the text to show while an answer
streams. History is opaque to callers: `[(query, response), ...]` for ChatGLM-6B/ChatGLM2-6B, a list of role
messages (`{"role", "content", "metadata"?, "tools"?}`) for ChatGLM3-6B. The families live in `prompt.py`
(ChatGLM-6B), `chat_glm2.py` and `chat_glm3.py`.
"""
from __future__ import annotations

from typing import Any, Sequence

from .generation_config import CHAT_MAX_LENGTH, CHAT_TEMPERATURE, CHAT_TOP_P
from .prompt import chat_prompt, clean_response


class ChatFormat:
    """The ChatGLM-6B format (SPEC.md section 5); the base of the others."""

    family = "chatglm"
    display_name = "ChatGLM-6B"
    # the original chat()'s defaults (SPEC II.5.3)
    max_length = CHAT_MAX_LENGTH
    top_p = CHAT_TOP_P
    temperature = CHAT_TEMPERATURE
    roles: tuple[str, ...] = ()  # query roles beside "user" (ChatGLM3: observation)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.tokenizer.eos_token_id,)

    def new_history(self, *, system: str | None = None, tools: list | None = None) -> list:
        """An empty conversation; a system prompt and tools only where the family has them."""
        if system or tools:
            from .errors import ChatGLMError

            raise ChatGLMError(f"{self.display_name} has no system prompt or tools; use ChatGLM3-6B for them")
        return []

    def prompt_text(self, query: str, history: Sequence | None = None) -> str:
        return chat_prompt(query, history)

    def prompt_ids(self, query: str, history: Sequence | None = None, *, role: str = "user") -> list[int]:
        self._check_role(role)
        return self.tokenizer.encode(self.prompt_text(query, history))

    def output_text(self, token_ids: Sequence[int], text: str, finish_reason: str | None) -> str:
        """The raw answer text as the original chat() decodes it (ChatGLM3 differs)."""
        return text

    def process_response(self, output: str, query: str, history: Sequence | None = None, *,
                         role: str = "user") -> tuple[Any, list]:
        """(response, new history) from the raw generated text; the caller's history is not changed."""
        response = self.clean(output)
        return response, [tuple(h) for h in (history or [])] + [(query, response)]

    def clean(self, output: str) -> str:
        """The response text of raw output: what a stream shows as it grows."""
        return clean_response(output)

    def history_pairs(self, history: Sequence | None) -> list[tuple[str, str]]:
        """(query, response) pairs of a history, for displays and data that think in rounds."""
        return [tuple(h) for h in (history or [])]

    def _check_role(self, role: str) -> None:
        if role != "user" and role not in self.roles:
            from .errors import ChatGLMError

            raise ChatGLMError(f"{self.display_name} has no {role!r} turns; send the message as the user")


def chat_format_for(tokenizer) -> ChatFormat:
    """The chat format that belongs to a loaded tokenizer."""
    family = getattr(tokenizer, "family", "chatglm")
    if family == "chatglm2":
        from .chat_glm2 import ChatGLM2Format

        return ChatGLM2Format(tokenizer)
    if family == "chatglm3":
        from .chat_glm3 import ChatGLM3Format

        return ChatGLM3Format(tokenizer)
    return ChatFormat(tokenizer)
