"""Generation settings, torch-free (the CLI and the server build them before torch is imported).

The chat defaults of the original `chat()` are spelled here once; `chat.py`, the server and the
CLI take them from here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import ChatGLMError

# The original chat()/stream_chat() defaults (SPEC.md section 5).
CHAT_MAX_LENGTH = 2048
CHAT_TOP_P = 0.7
CHAT_TEMPERATURE = 0.95
MIN_TEMPERATURE = 1e-5  # below this, logits / temperature overflows float32 to inf: garbage, not "nearly greedy"
MAX_TEMPERATURE = 100.0


def check_temperature(value: float, name: str = "temperature") -> float:
    """A sampling temperature every route and command accepts: exactly 0 (greedy) or a finite value in
    [MIN_TEMPERATURE, MAX_TEMPERATURE]; anything else is a ChatGLMError naming the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value == 0 or MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):
        raise ChatGLMError(f"{name} must be 0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g},"
                           f" not {value!r}")
    return float(value)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens, as in the original chat(); used when max_new_tokens is None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely one; 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None  # the same seed gives the same tokens on every decode path (sampling.py)
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's eos (<eop>)
    stop_strings: tuple[str, ...] = ()
    truncate_prompt: bool = False  # drop tokens from the left instead of refusing a too-long prompt

    @classmethod
    def chat(cls, **overrides) -> "GenerationConfig":
        """The original chat() defaults: sampling at temperature 0.95, top_p 0.7, 2048 tokens in all."""
        values = dict(max_length=CHAT_MAX_LENGTH, do_sample=True, top_p=CHAT_TOP_P, temperature=CHAT_TEMPERATURE)
        values.update(overrides)
        return cls(**values)

    def validate(self) -> "GenerationConfig":
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ChatGLMError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample:
            check_temperature(self.temperature)
        if self.do_sample and self.temperature == 0:
            return replace(self, do_sample=False)  # temperature 0 means greedy
        for name in ("top_p", "min_p", "repetition_penalty"):
            if getattr(self, name) != getattr(self, name):  # NaN passes every comparison below
                raise ChatGLMError(f"{name} must be a number, not nan")
        if not 0 < self.top_p <= 1:
            raise ChatGLMError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ChatGLMError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ChatGLMError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ChatGLMError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self
