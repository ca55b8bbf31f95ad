"""`chat()` / `stream_chat()` with the original's signature and defaults (SPEC.md section 5, II.5), for every
model family through its ChatFormat (chat_format.py)."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from .chat_format import ChatFormat, chat_format_for
from .generate import generate, stream_text
from .generation_config import GenerationConfig
from .prompt import SPACE_CLEAN_UP, History, clean_response


def chat_generation_config(fmt: ChatFormat | None = None, *, max_length: int | None = None, do_sample: bool = True,
                           top_p: float | None = None, temperature: float | None = None, **kwargs) -> GenerationConfig:
    """The original chat()'s settings: the family's defaults (ChatGLM-6B's without a format) and stop ids."""
    fmt = fmt or ChatFormat
    kwargs.pop("num_beams", None)  # accepted for compatibility; beam search is not offered
    kwargs.pop("logits_processor", None)
    if isinstance(fmt, ChatFormat):
        kwargs.setdefault("stop_token_ids", fmt.stop_token_ids)
    return GenerationConfig(max_length=fmt.max_length if max_length is None else max_length, do_sample=do_sample,
                            top_p=fmt.top_p if top_p is None else top_p,
                            temperature=fmt.temperature if temperature is None else temperature, **kwargs)


def chat(model, tokenizer, query: str, history: History | list | None = None, *, role: str = "user",
         **kwargs) -> tuple[Any, list]:
    """(response, new history). ChatGLM3's response is a dict for a tool call; `role="observation"` sends a
    tool's result. The caller's history list is not changed."""
    fmt = chat_format_for(tokenizer)
    gen = chat_generation_config(fmt, **kwargs)
    ids = fmt.prompt_ids(query, history, role=role)
    (result,) = generate(model, tokenizer, [ids], gen)
    output = fmt.output_text(result.token_ids, result.text, result.finish_reason)
    return fmt.process_response(output, query, history, role=role)


def stream_chat(model, tokenizer, query: str, history: History | list | None = None, *, role: str = "user",
                **kwargs) -> Iterator[tuple[Any, list]]:
    """Yield (response so far, history including it) as the answer grows; the last item is chat()'s result."""
    fmt = chat_format_for(tokenizer)
    gen = chat_generation_config(fmt, **kwargs)
    ids = fmt.prompt_ids(query, history, role=role)
    result, shown = None, None
    for _, result in stream_text(model, tokenizer, ids, gen):
        if shown is not None:  # one behind: the last item gets the final treatment below
            yield fmt.process_response(shown, query, history, role=role)
        shown = result.text
    if result is not None:
        output = fmt.output_text(result.token_ids, result.text, result.finish_reason)
        yield fmt.process_response(output, query, history, role=role)


class ResponseStreamer:
    """Prints a cleaned response as it grows: clean-up depends on the next character, so hold back
    trailing punctuation/space, the start of a contraction (" n", " 'r") and a partial `[[训练时间]]` until
    what follows is known."""

    _UNSTABLE_TAIL = " \t\n,!:;?"
    _PLACEHOLDER = "[[训练时间]]"

    def __init__(self, clean: Callable[[str], str] = clean_response) -> None:
        self.clean = clean  # the family's clean-up (ChatFormat.clean)
        self.printed = ""
        self.response = ""

    def update(self, raw_text: str) -> str:
        self.response = self.clean(raw_text)
        stable = self.response
        while stable and stable[-1] in self._UNSTABLE_TAIL:
            stable = stable[:-1]
        for k in range(3, 0, -1):  # a start of " n't", " 're", " 've"... : the decode's clean-up may still apply
            if any(before.startswith(stable[-k:]) and len(before) > k for before, _ in SPACE_CLEAN_UP):
                stable = stable[:-k]
                break
        for k in range(len(self._PLACEHOLDER) - 1, 0, -1):
            if stable.endswith(self._PLACEHOLDER[:k]):
                stable = stable[:-k]
                break
        return self._advance(stable)

    def finish(self) -> str:
        return self._advance(self.response)

    def final(self, response: str) -> str:
        """The rest of the post-processed final response (ChatGLM3 shows an answer without a first line only
        once it is known not to be a tool call)."""
        self.response = response
        return self._advance(response)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.printed):
            return ""
        delta = text[len(self.printed):]
        self.printed = text
        return delta
