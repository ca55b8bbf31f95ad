"""Optional dependencies: a missing one is a one-line install hint, never an ImportError traceback."""
from __future__ import annotations

import importlib.util

from .errors import ChatGLMError

# top-level module -> the extra of `pip install 'chatglm-ft[EXTRA]'` that brings it
EXTRA_OF = {
    "peft": "train", "tqdm": "train", "yaml": "train", "tensorboard": "train",
    "jieba": "eval", "rouge_chinese": "eval", "nltk": "eval", "matplotlib": "eval",
    "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "h11": "serve",
}


def install_hint(purpose: str, modules: list[str]) -> str:
    extras = sorted({EXTRA_OF.get(m, "all") for m in modules})
    names = ", ".join("pyyaml" if m == "yaml" else m for m in modules)
    return f"{purpose} needs {names}: pip install 'chatglm-ft[{','.join(extras)}]'"


def require_extra(purpose: str, *modules: str) -> None:
    """Raise ChatGLMError with the install hint when any of `modules` is not installed (checked, not imported)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ChatGLMError(install_hint(purpose, missing))


def missing_extra(error: ImportError, command: str) -> ChatGLMError | None:
    """The hint for an ImportError of an optional dependency met anywhere in a command; None for any other."""
    name = (getattr(error, "name", None) or "").partition(".")[0]
    if name not in EXTRA_OF:
        return None
    return ChatGLMError(install_hint(f"`chatglm-ft {command}` with these options", [name]))
