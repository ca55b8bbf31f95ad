"""ChatGLM2-6B / ChatGLM3-6B configuration, read from the checkpoint's config.json (SPEC.md II.1),
and which ChatGLM generation a config.json describes.

No torch import here, so `chatglm-ft --help` starts fast.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .config import check_sizes
from .errors import CheckpointError

# The largest sane value of each size a ChatGLM2/3 config.json states (see config.SIZE_LIMITS).
SIZE_LIMITS_GLM2 = {
    "padded_vocab_size": 1 << 22, "hidden_size": 1 << 16, "num_layers": 1024, "num_attention_heads": 1024,
    "kv_channels": 1 << 12, "multi_query_group_num": 1024, "ffn_hidden_size": 1 << 20, "seq_length": 1 << 20,
}

FAMILIES = ("chatglm", "chatglm2", "chatglm3")  # ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B


def family_of(raw: dict[str, Any], tokenizer_config: dict[str, Any] | None = None) -> str:
    """'chatglm' (ChatGLM-6B), 'chatglm2' or 'chatglm3' from config.json (and tokenizer_config.json).

    All three say model_type "chatglm". ChatGLM-6B has inner_hidden_size and 2D positions;
    ChatGLM2/3 have ffn_hidden_size and multi-query attention. ChatGLM2 and ChatGLM3 share the
    network and differ only in how the rotary table is rounded in 16-bit (SPEC.md II.3.5): the
    repository name the files carry decides, then ChatGLM3-only fields (rope_ratio, its 8k seq_length).
    """
    if "ffn_hidden_size" not in raw and "multi_query_group_num" not in raw and "padded_vocab_size" not in raw:
        return "chatglm"
    names = [str(raw.get("_name_or_path", "")), str((tokenizer_config or {}).get("name_or_path", ""))]
    for name in names:
        lowered = name.lower()
        if "chatglm3" in lowered:
            return "chatglm3"
        if "chatglm2" in lowered:
            return "chatglm2"
    if "rope_ratio" in raw or raw.get("seq_length") == 8192:
        return "chatglm3"
    return "chatglm2"


# seq_length of the released config.json files (THUDM/chatglm2-6b, THUDM/chatglm3-6b)
PUBLISHED_SEQ_LENGTH = {"chatglm2": 32768, "chatglm3": 8192}


@dataclass
class ChatGLM2Config:
    """The fields of ChatGLM2/3's config.json that the network uses (SPEC.md II.1).

    The defaults are the released ChatGLM2-6B's, not the original config class's (which differ);
    `from_dict` always reads the checkpoint's own file.
    """

    family: str = "chatglm2"  # "chatglm2" or "chatglm3" (not a config.json field: see family_of)
    num_layers: int = 28
    hidden_size: int = 4096
    num_attention_heads: int = 32
    kv_channels: int = 128
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 13696
    padded_vocab_size: int = 65024
    seq_length: int = 32768
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "float16"
    tie_word_embeddings: bool = False
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    # Our own quantization scheme, written by `chatglm-ft quantize` (None for THUDM's format).
    quantization: dict[str, Any] | None = None
    # Keys we do not interpret are kept so that saving writes them back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- the names the rest of the package uses for every family ---------------------------------
    @property
    def vocab_size(self) -> int:
        return self.padded_vocab_size

    @property
    def max_sequence_length(self) -> int:
        """Positions must stay below seq_length (the rotary table's length)."""
        return self.seq_length

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def kv_heads(self) -> int:
        """Key/value heads G (each shared by num_attention_heads / G query heads)."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return self.kv_channels // 2

    bos_token_id = None  # no <sop> convention: prompts are not GLM prefix-LM blocks

    @classmethod
    def full(cls, family: str = "chatglm2") -> "ChatGLM2Config":
        """The published ChatGLM2-6B or ChatGLM3-6B shape (for random-weight benchmarks): the defaults,
        with the generation's context length (the only shape field in which the two differ)."""
        return cls(family=family, seq_length=PUBLISHED_SEQ_LENGTH[family])

    @classmethod
    def tiny(cls, **overrides: Any) -> "ChatGLM2Config":
        """The shape of the golden test checkpoints: 2 layers, hidden 64, 4 heads of 16, 2 KV groups."""
        values: dict[str, Any] = dict(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16,
                                      multi_query_group_num=2, ffn_hidden_size=256)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config", family: str | None = None) -> "ChatGLM2Config":
        if raw.get("model_type") != "chatglm":
            raise CheckpointError(f"{source}: model_type is {raw.get('model_type')!r}, not 'chatglm'; this is not a"
                                  " ChatGLM checkpoint")
        family = family or family_of(raw)
        if family not in ("chatglm2", "chatglm3"):
            raise CheckpointError(f"{source}: not a ChatGLM2-6B or ChatGLM3-6B config.json")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "family"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names and k != "vocab_size"}
        check_sizes(raw, source, SIZE_LIMITS_GLM2, vocab_key="padded_vocab_size")
        missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "kv_channels", "ffn_hidden_size",
                               "padded_vocab_size") if k not in raw]
        if missing:
            raise CheckpointError(f"{source}: missing {', '.join(missing)}; restore config.json from the model repository")
        config = cls(family=family, **known, extra=extra)
        if config.quantization_bit is None:
            config.quantization_bit = 0
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        """Refuse what the network does not implement, rather than compute something else."""
        unsupported = [name for name, value, wanted in [
            ("rmsnorm", self.rmsnorm, True), ("post_layer_norm", self.post_layer_norm, True),
            ("apply_residual_connection_post_layernorm", self.apply_residual_connection_post_layernorm, False),
            ("add_bias_linear", self.add_bias_linear, False), ("tie_word_embeddings", self.tie_word_embeddings, False),
            ("multi_query_attention", self.multi_query_attention, True),  # false would interleave q,k,v per head
        ] if bool(value) != wanted]
        if unsupported:
            raise CheckpointError(f"{source}: {unsupported[0]}={getattr(self, unsupported[0])} is not supported"
                                  " (no released ChatGLM2/3 checkpoint uses it)")
        if self.num_attention_heads % self.kv_heads:
            raise CheckpointError(f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple of"
                                  f" multi_query_group_num {self.kv_heads}")
        if self.kv_channels % 4:
            raise CheckpointError(f"{source}: kv_channels {self.kv_channels} must be divisible by 4 (rotary pairs)")

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "family")})
        if out.get("quantization") is None:
            out.pop("quantization", None)
        for absent_by_default in ("pre_seq_len",):
            if out.get(absent_by_default) is None:
                out.pop(absent_by_default, None)
        out["model_type"] = "chatglm"
        out.setdefault("_name_or_path", f"THUDM/{self.family}-6b")  # keeps the family when saved and reloaded
        return out

    def save(self, path) -> None:
        from pathlib import Path

        Path(path, "config.json").write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
