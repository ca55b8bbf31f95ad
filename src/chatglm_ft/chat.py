"""`chat()` / `stream_chat()` with the original's signature and defaults (SPEC.md section 5)."""
from __future__ import annotations

from typing import Iterator

from .generate import generate, stream_text
from .generation_config import CHAT_MAX_LENGTH, CHAT_TEMPERATURE, CHAT_TOP_P, GenerationConfig
from .prompt import History, chat_prompt, clean_response


def chat_generation_config(
    *, max_length: int = CHAT_MAX_LENGTH, do_sample: bool = True, top_p: float = CHAT_TOP_P,
    temperature: float = CHAT_TEMPERATURE, **kwargs
) -> GenerationConfig:
    kwargs.pop("num_beams", None)  # accepted for compatibility; beam search is not offered
    kwargs.pop("logits_processor", None)
    return GenerationConfig(max_length=max_length, do_sample=do_sample, top_p=top_p, temperature=temperature, **kwargs)


def chat(model, tokenizer, query: str, history: History | None = None, **kwargs) -> tuple[str, list[tuple[str, str]]]:
    history = [tuple(h) for h in (history or [])]
    gen = chat_generation_config(**kwargs)
    ids = tokenizer.encode(chat_prompt(query, history))
    (result,) = generate(model, tokenizer, [ids], gen)
    response = clean_response(result.text)
    return response, history + [(query, response)]


def stream_chat(model, tokenizer, query: str, history: History | None = None, **kwargs) -> Iterator[tuple[str, list]]:
    """Yield (response so far, history including it) as the answer grows."""
    history = [tuple(h) for h in (history or [])]
    gen = chat_generation_config(**kwargs)
    ids = tokenizer.encode(chat_prompt(query, history))
    response = ""
    for _, result in stream_text(model, tokenizer, ids, gen):
        response = clean_response(result.text)
        yield response, history + [(query, response)]


class ResponseStreamer:
    """Prints a cleaned response as it grows: clean-up depends on the next character, so hold back
    trailing punctuation/space (and a partial `[[训练时间]]`) until what follows is known."""

    _UNSTABLE_TAIL = " \t\n,!:;?"
    _PLACEHOLDER = "[[训练时间]]"

    def __init__(self) -> None:
        self.printed = ""
        self.response = ""

    def update(self, raw_text: str) -> str:
        self.response = clean_response(raw_text)
        stable = self.response
        while stable and stable[-1] in self._UNSTABLE_TAIL:
            stable = stable[:-1]
        for k in range(len(self._PLACEHOLDER) - 1, 0, -1):
            if stable.endswith(self._PLACEHOLDER[:k]):
                stable = stable[:-k]
                break
        return self._advance(stable)

    def finish(self) -> str:
        return self._advance(self.response)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.printed):
            return ""
        delta = text[len(self.printed):]
        self.printed = text
        return delta
