"""Which tokenizer a checkpoint directory holds, read from its files (never from the folder's name).

- `ice_text.model`: ChatGLM-6B (tokenizer.py).
- `tokenizer.model`: ChatGLM2-6B or ChatGLM3-6B (tokenizer_glm2.py). They share that file; what tells them apart is
  the tokenizer code shipped beside it (ChatGLM3's `tokenization_chatglm.py` defines `<|observation|>`) or, in a
  directory without code, the model id THUDM wrote into `tokenizer_config.json` (`name_or_path`).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import TokenizerError

FAMILIES = ("chatglm", "chatglm2", "chatglm3")


def detect_family(path: str | Path) -> str:
    """"chatglm" (ChatGLM-6B), "chatglm2" or "chatglm3" for a checkpoint directory."""
    path = Path(path)
    if (path / "ice_text.model").exists():
        return "chatglm"
    if not (path / "tokenizer.model").exists():
        other = [p.name for p in path.glob("*.model")] if path.is_dir() else []
        found = f" (found {', '.join(other)})" if other else ""
        raise TokenizerError(
            f"{path}: no ice_text.model or tokenizer.model{found}; copy the tokenizer files of the checkpoint into it"
        )
    code = path / "tokenization_chatglm.py"
    if code.exists():
        return "chatglm3" if "<|observation|>" in code.read_text(encoding="utf-8", errors="replace") else "chatglm2"
    config_file = path / "tokenizer_config.json"
    name = ""
    if config_file.exists():
        try:
            name = str(json.loads(config_file.read_text(encoding="utf-8")).get("name_or_path", ""))
        except (json.JSONDecodeError, AttributeError) as e:
            raise TokenizerError(f"{config_file}: not valid JSON ({e}); restore it from the model repository")
    model_id = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for family in ("chatglm3", "chatglm2"):
        if model_id.startswith(family):
            return family
    raise TokenizerError(
        f"{path}: cannot tell ChatGLM2-6B from ChatGLM3-6B (tokenizer_config.json names {name or 'no model'});"
        ' set "name_or_path" there to "THUDM/chatglm3-6b" or "THUDM/chatglm2-6b"'
    )


def load_tokenizer(path: str | Path, *, family: str | None = None):
    """The tokenizer of a checkpoint directory: ChatGLMTokenizer or ChatGLM2Tokenizer (v2 or v3)."""
    family = family or detect_family(path)
    if family not in FAMILIES:
        raise TokenizerError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    if family == "chatglm":
        from .tokenizer import ChatGLMTokenizer

        return ChatGLMTokenizer.from_dir(path)
    from .tokenizer_glm2 import ChatGLM2Tokenizer

    return ChatGLM2Tokenizer.from_dir(path, roles=family == "chatglm3")


def tokenizer_family(tokenizer) -> str:
    """The family of a loaded tokenizer (ChatGLM-6B's has no `family` attribute)."""
    return getattr(tokenizer, "family", "chatglm")
