"""chatglm-ft: run and LoRA-fine-tune ChatGLM-6B locally, in clean PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def load(*args, **kwargs):
    """`model, tokenizer = load(path, dtype=..., device=..., quantize=..., adapter=...)`; see api.load."""
    from .api import load as _load

    return _load(*args, **kwargs)
