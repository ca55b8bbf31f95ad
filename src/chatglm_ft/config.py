"""ChatGLM-6B configuration, read from the checkpoint's own config.json (SPEC.md section 1).

No torch import here, so `chatglm-ft --help` starts fast.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# The original implementation fixes the residual scale at its value for 28 layers (SPEC.md section 2).
RESIDUAL_ALPHA = math.sqrt(2 * 28)


# Sizes a config.json may state, with the largest sane value: a wrong or hostile file fails at load with the limit,
# not later when the server tries to allocate a KV cache of petabytes.
SIZE_LIMITS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "num_layers": 1024, "num_attention_heads": 1024,
    "inner_hidden_size": 1 << 20, "max_sequence_length": 1 << 20,
}
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id")


def check_sizes(raw: dict[str, Any], source: str, limits: dict[str, int] = SIZE_LIMITS,
                vocab_key: str = "vocab_size") -> None:
    """Refuse sizes that are not whole numbers in (0, limit] and token ids that are not ids of the vocabulary."""
    def whole(key: str) -> bool:
        value = raw[key]
        return isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, float) and value.is_integer())

    for key, limit in limits.items():
        if key not in raw:
            continue
        if not whole(key) or not 0 < raw[key] <= limit:
            raise CheckpointError(f"{source}: {key} is {raw[key]!r}; it must be a whole number from 1 to {limit:,}:"
                                  " restore config.json from the model repository")
        raw[key] = int(raw[key])
    vocab = raw.get(vocab_key, limits[vocab_key])
    for key in TOKEN_ID_KEYS:
        if raw.get(key) is not None and (not whole(key) or not 0 <= raw[key] < vocab):
            raise CheckpointError(f"{source}: {key} is {raw[key]!r}, not a token id below vocab_size {vocab}")
    eps = raw.get("layernorm_epsilon")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
        raise CheckpointError(f"{source}: layernorm_epsilon is {eps!r}; it must be a small positive number such as 1e-5")


@dataclass
class ChatGLMConfig:
    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int = 130004
    eos_token_id: int = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int = 3
    torch_dtype: str = "float16"
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    # Our own quantization scheme, written by `chatglm-ft quantize` (None for THUDM's format).
    quantization: dict[str, Any] | None = None
    # Keys we do not interpret are kept so that saving writes them back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer: one per query head (ChatGLM2/3 share them in groups)."""
        return self.num_attention_heads

    @classmethod
    def full(cls) -> "ChatGLMConfig":
        """The published ChatGLM-6B (for random-weight benchmarks)."""
        return cls()

    @classmethod
    def tiny(cls, **overrides: Any) -> "ChatGLMConfig":
        """The shape of the golden test checkpoint: 2 layers, hidden 64, 4 heads."""
        values: dict[str, Any] = dict(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=256)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config") -> "ChatGLMConfig":
        model_type = raw.get("model_type")
        if model_type != "chatglm":
            raise CheckpointError(
                f"{source}: model_type is {model_type!r}, not 'chatglm'; chatglm-ft needs a ChatGLM-6B checkpoint"
            )
        if "num_layers" not in raw or "inner_hidden_size" not in raw:
            # chatglm2/3 share model_type "chatglm" but use num_layers+ffn_hidden_size / multi-query attention.
            hint = (" (this is a ChatGLM2/3-6B config: read it with chatglm_ft.config.load_config)"
                    if "ffn_hidden_size" in raw else "")
            raise CheckpointError(f"{source}: missing num_layers/inner_hidden_size{hint}")
        check_sizes(raw, source)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names}
        config = cls(**known, extra=extra)
        if config.quantization_bit is None:
            config.quantization_bit = 0
        if config.hidden_size % config.num_attention_heads:
            raise CheckpointError(f"{source}: hidden_size {config.hidden_size} is not divisible by num_attention_heads")
        if config.head_dim % 4:
            raise CheckpointError(f"{source}: head size {config.head_dim} must be divisible by 4 for 2D rotary")
        if not config.position_encoding_2d:
            raise CheckpointError(f"{source}: position_encoding_2d=false is not supported (ChatGLM-6B uses 2D positions)")
        return config

    @classmethod
    def from_dir(cls, path: str | Path) -> "ChatGLMConfig":
        raw, config_file = read_config_json(path)
        return cls.from_dict(raw, source=str(config_file))

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        if out.get("quantization") is None:
            out.pop("quantization", None)
        out["model_type"] = "chatglm"
        out.setdefault("architectures", ["ChatGLMForConditionalGeneration"])
        return out

    def save(self, path: str | Path) -> None:
        Path(path, "config.json").write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")


def read_config_json(path: str | Path) -> tuple[dict[str, Any], Path]:
    """config.json of a checkpoint directory as a dict (and the file), with one-line errors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory; pass --model DIR (a ChatGLM-6B checkpoint directory)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass the checkpoint directory, not a file inside it")
    config_file = path / "config.json"
    if not config_file.exists():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise CheckpointError(f"{path}: no config.json (found: {found}); is this a ChatGLM-6B checkpoint directory?")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e}); restore the file from the model repository")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    return raw, config_file


def load_config(path: str | Path) -> "ChatGLMConfig | ChatGLM2Config":
    """The config of whichever ChatGLM generation the directory holds (config.json decides, not the folder name)."""
    from .config_glm2 import ChatGLM2Config, family_of

    raw, config_file = read_config_json(path)
    tokenizer_config = {}
    try:
        tokenizer_config = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    family = family_of(raw, tokenizer_config if isinstance(tokenizer_config, dict) else None)
    if family == "chatglm":
        return ChatGLMConfig.from_dict(raw, source=str(config_file))
    return ChatGLM2Config.from_dict(raw, source=str(config_file), family=family)
