"""P-Tuning v2 (SPEC.md II.7): a trained prefix of keys/values that every token of every layer attends to.

The prefix encoder lives at `transformer.prefix_encoder` with THUDM's parameter names
(`embedding.weight`, and `trans.0` / `trans.2` with `prefix_projection`), so a prefix directory in the
layout THUDM's ptuning trainers write (config.json with `pre_seq_len` + a pytorch_model.bin holding
only `transformer.prefix_encoder.*` in float32) loads here, and one saved here loads with THUDM's code.

How decoding uses it:
- `PrefixEncoder.forward` turns the prefix into per-layer keys/values, which are not rotated;
- the KV cache's first P columns hold them (`setup_caches` sizes the cache for them, and
  `refresh_prefix_cache` writes them whenever the caches do not hold the current prefix: a new encoder or
  parameters changed in place; the decoders call it before each prefill);
- steps.py (cached steps) turns sequence column c into cache column P + c, attends over P more columns and
  prepends P always-visible key columns to the layout's mask (`prefix_mask`); without a cache (training,
  evaluation losses) model.py puts the prefix keys/values in front itself.
Positions do not change (ChatGLM-6B's 2D positions and ChatGLM2/3's 1D positions ignore the prefix).

What differs between the generations (SPEC.md II.7.1) is one `Generation` record per family: the key/value
heads (N for ChatGLM-6B, the G groups for ChatGLM2/3), the width the projection variant embeds into (H for
ChatGLM-6B, K for ChatGLM2/3) and the config fields a prefix must share with its base (`prefix_shape`,
`check_same_model`). ChatGLM2/3 have a `prefix_encoder` on their transformer used through
`prefix_inputs`/`with_prefix` as model.py does (SPEC.md II.7.3). steps.py shifts their cached steps as any
model's; their layout's None mask (an unpadded prompt) stays None, which their attention reads as causal
over the last T of the S keys, so the prefix columns in front are visible.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

PREFIX_KEY = "transformer.prefix_encoder."
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "pytorch_model.bin"  # what THUDM's trainer writes (transformers 4.27-4.33)
SAFE_WEIGHTS_FILE = "model.safetensors"  # what newer transformers write from the same trainer
PREFIX_DROPOUT = 0.1  # the original's prefix dropout (training only)


# -- shapes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefixShape:
    """What a prefix must look like for one model; the family decides the widths (SPEC.md II.7.1)."""

    pre_seq_len: int  # P
    projection: bool
    num_layers: int  # L
    kv_heads: int  # key/value heads per layer: N for ChatGLM-6B, G for ChatGLM2/3
    head_dim: int
    hidden_size: int  # H: the projection's hidden width
    embedding_width: int  # ChatGLM-6B with projection embeds into H; otherwise (and ChatGLM2/3 always) into K

    @property
    def kv_width(self) -> int:
        """K: one key and one value per layer, per prefix position."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"embedding.weight": (self.pre_seq_len, self.embedding_width)}
        if self.projection:
            shapes.update({"trans.0.weight": (self.hidden_size, self.embedding_width), "trans.0.bias": (self.hidden_size,),
                           "trans.2.weight": (self.kv_width, self.hidden_size), "trans.2.bias": (self.kv_width,)})
        return shapes


@dataclass(frozen=True)
class Generation:
    """What a prefix looks like for one model generation (SPEC.md II.7.1)."""

    title: str  # for messages
    size_fields: tuple[str, ...]  # config.json fields a prefix must share with its base
    grouped_kv: bool  # keys/values per G key/value group (ChatGLM2/3), else per attention head
    projection_embeds_kv: bool  # with projection, the embedding is [P, K] (ChatGLM2/3), else [P, H]

    def kv_heads(self, config) -> int:
        return config.kv_heads if self.grouped_kv else config.num_attention_heads

    def describe(self, sizes: dict[str, Any]) -> str:
        text = f"{sizes['num_layers']} layers, hidden {sizes['hidden_size']}, {sizes['num_attention_heads']} heads"
        if self.grouped_kv:
            text += f", {sizes['multi_query_group_num']} key/value groups of {sizes['kv_channels']}"
        return text


GLM2_SIZES = ("num_layers", "hidden_size", "num_attention_heads", "kv_channels", "multi_query_group_num")
GENERATIONS = {
    "chatglm": Generation("ChatGLM-6B", ("num_layers", "hidden_size", "num_attention_heads"), False, False),
    "chatglm2": Generation("ChatGLM2-6B", GLM2_SIZES, True, True),
    "chatglm3": Generation("ChatGLM3-6B", GLM2_SIZES, True, True),
}


def family_of_config(config) -> str:
    """'chatglm', 'chatglm2' or 'chatglm3' of a loaded config (ChatGLM-6B's config has no family field)."""
    return getattr(config, "family", "chatglm")


def prefix_shape(config, pre_seq_len: int, projection: bool) -> PrefixShape:
    """The prefix geometry of a model's config, per its generation."""
    generation = GENERATIONS[family_of_config(config)]
    kv_heads = generation.kv_heads(config)
    kv_width = 2 * config.num_layers * kv_heads * config.head_dim
    return PrefixShape(pre_seq_len=pre_seq_len, projection=projection, num_layers=config.num_layers,
                       kv_heads=kv_heads, head_dim=config.head_dim, hidden_size=config.hidden_size,
                       embedding_width=config.hidden_size if projection and not generation.projection_embeds_kv
                       else kv_width)


# -- the module --------------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """THUDM's prefix encoder: P learned vectors, optionally through Linear-tanh-Linear, read as each layer's
    P keys and values. Kept in float32 (as THUDM's trainer and loading snippet keep it) over any base dtype."""

    def __init__(self, shape: PrefixShape, device: Any = None):
        super().__init__()
        self.shape = shape
        self.embedding = nn.Embedding(shape.pre_seq_len, shape.embedding_width, device=device)
        if shape.projection:
            self.trans = nn.Sequential(
                nn.Linear(shape.embedding_width, shape.hidden_size, device=device),
                nn.Tanh(),
                nn.Linear(shape.hidden_size, shape.kv_width, device=device),
            )
        self.dropout = nn.Dropout(PREFIX_DROPOUT)

    @property
    def pre_seq_len(self) -> int:
        return self.shape.pre_seq_len

    def forward(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (b, heads, P, hd) with b = 1 in eval (broadcast over the batch) and
        b = batch_size in training (the original draws an independent dropout mask per row)."""
        s = self.shape
        x = self.embedding.weight  # (P, E): the embedding of prefix tokens 0..P-1
        if s.projection:
            x = self.trans(x)  # (P, K)
        x = x.to(dtype).view(1, s.pre_seq_len, 2 * s.num_layers, s.kv_heads, s.head_dim)  # (1, P, 2L, heads, hd)
        if self.training and self.dropout.p > 0:
            x = self.dropout(x.expand(batch_size, -1, -1, -1, -1))  # (B, P, 2L, heads, hd)
        x = x.permute(2, 0, 3, 1, 4)  # (2L, b, heads, P, hd): slice 2i keys, 2i+1 values of layer i
        return [(x[2 * i], x[2 * i + 1]) for i in range(s.num_layers)]


# -- hooks (steps.py for cached steps, the networks without a cache) --------------------------------------
def prefix_inputs(encoder: PrefixEncoder | None, attn_mask, kv_caches, cache_columns, kv_length: int | None,
                  batch_size: int, dtype: torch.dtype):
    """What a transformer's forward passes its layers with a prefix: (attn_mask, cache_columns, kv_length,
    per-layer prefix keys/values or None). With a cache nothing changes: steps.py already put the sequence
    behind the prefix's cache columns and the prefix in the mask. Without one (training, evaluation losses)
    the mask gets the P prefix columns in front and each layer the prefix keys/values to put there."""
    if encoder is None or kv_caches is not None:
        return attn_mask, cache_columns, kv_length, None
    return prefix_mask(attn_mask, encoder.pre_seq_len), cache_columns, kv_length, encoder(batch_size, dtype)


def with_prefix(k: torch.Tensor, v: torch.Tensor, prefix_kv: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values (B, heads, S, d) with the prefix's (b, heads, P, d) in front (no cache: nothing else put them there)."""
    if prefix_kv is None:
        return k, v
    B = k.shape[0]
    return (torch.cat([prefix_kv[0].to(k.device).expand(B, -1, -1, -1), k], dim=2),
            torch.cat([prefix_kv[1].to(v.device).expand(B, -1, -1, -1), v], dim=2))


def prefix_mask(mask, pre_seq_len: int):
    """The attention mask with P visible key columns in front: a (B, 1, T, S) bool mask (True = visible)
    gets (B, 1, T, P) True; a model.PromptMask records the prefix; None (all visible) stays None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):  # model.PromptMask (not imported: model.py imports this module)
        return dataclasses.replace(mask, prefix=pre_seq_len)
    visible = mask.new_ones(*mask.shape[:-1], pre_seq_len)  # (B, 1, T, P)
    return torch.cat([visible, mask], dim=-1)  # (B, 1, T, P + S)


def refresh_prefix_cache(model) -> None:
    """Write the model's prefix into its caches unless they already hold it as it is now: a new encoder, or
    parameters changed in place (training steps bump a tensor's version counter) are written again. The
    decoders call this before each prefill, so a cache set up earlier never serves a stale prefix."""
    encoder, caches = prefix_encoder_of(model), getattr(model, "kv_caches", None)
    if encoder is None or caches is None:
        return
    key = (id(encoder), tuple((p.data_ptr(), p._version) for p in encoder.parameters()))
    if getattr(caches, "prefix_key", None) != key:
        write_prefix_cache(encoder, caches)
        caches.prefix_key = key


@torch.inference_mode()  # caches made under inference mode (generation) may only be written in it
def write_prefix_cache(encoder: PrefixEncoder, kv_caches) -> None:
    """Put the prefix keys/values into the first P columns of every slot of every layer's cache."""
    P = encoder.pre_seq_len
    for (k, v), cache in zip(encoder(1, cache_dtype(kv_caches)), kv_caches):
        cache.k[:, :, :P] = k.to(cache.k.device)
        cache.v[:, :, :P] = v.to(cache.v.device)


def cache_dtype(kv_caches) -> torch.dtype:
    return kv_caches[0].k.dtype


def prefix_length(model) -> int:
    """P of the model's prefix encoder (0 without one); works for a PEFT-wrapped model too."""
    encoder = prefix_encoder_of(model)
    return encoder.pre_seq_len if encoder is not None else 0


def prefix_encoder_of(model) -> PrefixEncoder | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.transformer, "prefix_encoder", None)


# -- attaching -----------------------------------------------------------------------------------------
def add_prefix_encoder(model, *, pre_seq_len: int, projection: bool = False, seed: int | None = None) -> PrefixEncoder:
    """Attach a fresh float32 prefix encoder (for training) and freeze everything else, as THUDM's model does
    when `pre_seq_len` is set. Initialisation: nn.Embedding's N(0, 1) and nn.Linear's defaults."""
    if pre_seq_len < 1:
        raise CheckpointError(f"pre_seq_len must be at least 1, not {pre_seq_len}")
    if seed is not None:
        torch.manual_seed(seed)
    encoder = PrefixEncoder(prefix_shape(model.config, pre_seq_len, projection), device=model.device)
    attach(model, encoder)
    model.requires_grad_(False)
    encoder.requires_grad_(True)
    return encoder


def attach(model, encoder: PrefixEncoder) -> None:
    """Install `encoder` as `transformer.prefix_encoder` and record it in the model's config."""
    model.transformer.prefix_encoder = encoder.float()
    model.config.pre_seq_len = encoder.pre_seq_len
    model.config.prefix_projection = encoder.shape.projection
    model.kv_caches = None  # the cache gains the prefix columns on the next setup_caches


def detach(model) -> None:
    """Remove the prefix encoder: the base model exactly as before (evaluation of several variants)."""
    model.transformer.prefix_encoder = None
    model.config.pre_seq_len = None
    model.config.prefix_projection = False
    model.kv_caches = None


# -- the directory layout THUDM's trainers write -----------------------------------------------------------
def is_prefix_dir(path: str | Path) -> bool:
    """Whether `path` looks like a P-Tuning checkpoint: a config.json with pre_seq_len, no PEFT adapter config."""
    path = Path(path).expanduser()
    if not (path / CONFIG_FILE).is_file() or (path / "adapter_config.json").exists():
        return False
    try:
        raw = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and bool(raw.get("pre_seq_len"))


def prefix_dir(path: str | Path) -> Path:
    """The prefix directory for `path`: the path itself, or its `prefix/` (a `chatglm-ft train` output dir)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such P-Tuning directory")
    if not (path / CONFIG_FILE).exists() and (path / "prefix" / CONFIG_FILE).exists():
        path = path / "prefix"
    return path


def read_prefix(path: str | Path, base_config) -> PrefixEncoder:
    """Read and check a P-Tuning directory against the base model's config; a float32 PrefixEncoder on the CPU."""
    path = prefix_dir(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; pass the directory THUDM's ptuning trainer (or chatglm-ft train"
                              " --finetuning-type ptuning) wrote: config.json + pytorch_model.bin")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})")
    pre_seq_len = raw.get("pre_seq_len")
    if not isinstance(pre_seq_len, int) or pre_seq_len < 1:
        raise CheckpointError(f"{config_file}: no pre_seq_len, so this is not a P-Tuning checkpoint;"
                              " a LoRA adapter goes to --adapter, a full model to --model")
    projection = bool(raw.get("prefix_projection", False))
    check_same_model(raw, base_config, config_file)
    weights = read_prefix_weights(path)
    shape = prefix_shape(base_config, pre_seq_len, projection)
    check_prefix_tensors(weights, shape, path)
    encoder = PrefixEncoder(shape, device="meta")
    encoder.load_state_dict({name: tensor.float() for name, tensor in weights.items()}, assign=True)
    return encoder.float().eval()


def check_same_model(raw: dict, base_config, source: Path) -> None:
    """The prefix's config.json must describe the base's generation, architecture and size (a prefix is per-model)."""
    from .config_glm2 import family_of

    tokenizer_config = source.parent / "tokenizer_config.json"  # THUDM's trainer copies it beside the prefix
    try:
        tokenizer_raw = json.loads(tokenizer_config.read_text(encoding="utf-8")) if tokenizer_config.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        tokenizer_raw = None
    theirs_family, ours_family = family_of(raw, tokenizer_raw), family_of_config(base_config)
    if theirs_family != ours_family:
        theirs_title, ours_title = GENERATIONS[theirs_family].title, GENERATIONS[ours_family].title
        raise CheckpointError(f"{source}: a {theirs_title} prefix; load it on a {theirs_title} base model, not this"
                              f" {ours_title} one")
    generation = GENERATIONS[ours_family]
    theirs = {f: raw.get(f) for f in generation.size_fields}
    ours = {f: getattr(base_config, f) for f in generation.size_fields}
    if theirs != ours:
        raise CheckpointError(f"{source}: prefix for another model size ({generation.describe(theirs)}); the base has"
                              f" {generation.describe(ours)}: load it on the model it was trained on")


def read_prefix_weights(path: Path) -> dict[str, torch.Tensor]:
    """The prefix tensors (keys without `transformer.prefix_encoder.`); refuses a full model checkpoint."""
    if (path / WEIGHTS_FILE).is_file():
        try:
            state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a truncated or foreign file: pickle, zip and mmap errors differ
            raise CheckpointError(f"{path / WEIGHTS_FILE}: cannot read ({str(e).splitlines()[0][:200]})")
    elif (path / SAFE_WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / SAFE_WEIGHTS_FILE))
    else:
        sharded = sorted(p.name for p in path.glob("*.index.json"))
        if sharded:
            raise CheckpointError(f"{path}: a full model checkpoint ({sharded[0]}), not a P-Tuning prefix;"
                                  " pass it as --model, or pass the prefix-only directory to --ptuning")
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {SAFE_WEIGHTS_FILE} with the prefix encoder weights")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the weights file holds a {type(state).__name__}, not a state dict")
    others = [name for name in state if not name.startswith(PREFIX_KEY)]
    if others:
        raise CheckpointError(f"{path}: a full model checkpoint ({len(others)} tensors besides the prefix encoder, e.g."
                              f" {others[0]}), not a P-Tuning prefix; pass it as --model, the prefix-only directory to --ptuning")
    if not state:
        raise CheckpointError(f"{path}: no {PREFIX_KEY}* tensors in the weights file")
    return {name[len(PREFIX_KEY):]: tensor for name, tensor in state.items()}


def check_prefix_tensors(weights: dict[str, torch.Tensor], shape: PrefixShape, path: Path) -> None:
    expected = shape.tensor_shapes()
    embedding = weights.get("embedding.weight")
    if embedding is None:
        raise CheckpointError(f"{path}: no {PREFIX_KEY}embedding.weight in the weights file")
    if embedding.shape[0] != shape.pre_seq_len:
        raise CheckpointError(f"{path}: config.json says pre_seq_len {shape.pre_seq_len} but the prefix has"
                              f" {embedding.shape[0]} positions; set pre_seq_len to {embedding.shape[0]} in config.json")
    has_projection = any(name.startswith("trans.") for name in weights)
    if has_projection != shape.projection:
        raise CheckpointError(f"{path}: config.json says prefix_projection {str(shape.projection).lower()} but the weights"
                              f" {'hold' if has_projection else 'lack'} the projection (trans.*); fix prefix_projection")
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensor {PREFIX_KEY}{unknown[0]} in the prefix")
    for name, want in expected.items():
        got = tuple(weights[name].shape) if name in weights else None
        if got != want:
            raise CheckpointError(f"{path}: {PREFIX_KEY}{name} is {got}, this model needs {want}: a prefix for another"
                                  " model size; load it on the model it was trained on")


def load_prefix(model, path: str | Path) -> PrefixEncoder:
    """Read the P-Tuning directory `path`, check it against `model`, attach it (float32, frozen, eval mode)."""
    encoder = read_prefix(path, model.config).to(model.device)
    attach(model, encoder)
    encoder.requires_grad_(False)
    return encoder


def prefix_state_dict(encoder: PrefixEncoder) -> dict[str, torch.Tensor]:
    """The saved tensors: float32, contiguous, on the CPU, under their full `transformer.prefix_encoder.` names."""
    return {PREFIX_KEY + name: tensor.detach().float().cpu().contiguous().clone()
            for name, tensor in encoder.state_dict().items()}


def save_prefix(model, out: str | Path, *, state: dict[str, torch.Tensor] | None = None,
                tokenizer_dir: str | Path | None = None) -> Path:
    """Write `out` in THUDM's layout, atomically: config.json (the model's, with pre_seq_len and prefix_projection,
    torch_dtype float16 as after THUDM's `model.half()`), generation_config.json, and pytorch_model.bin holding only
    the float32 `transformer.prefix_encoder.*` tensors (`state`: already gathered ones, e.g. from FSDP shards)."""
    import shutil

    from .checkpoint import replace_dir
    from .tokenizer import TOKENIZER_FILES
    from .tokenizer_glm2 import TOKENIZER_FILES as GLM2_TOKENIZER_FILES

    encoder = prefix_encoder_of(model)
    if encoder is None:
        raise CheckpointError("the model has no prefix encoder to save")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp-partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization", None)  # the prefix belongs to the float model, whatever the base was trained in
    config.update(pre_seq_len=encoder.pre_seq_len, prefix_projection=encoder.shape.projection,
                  quantization_bit=0, torch_dtype="float16")
    family = family_of_config(model.config)
    from .config_glm2 import family_of

    if family_of(config) != family:  # the base's name did not tell its generation: name it, so loading can check
        config["_name_or_path"] = f"THUDM/{family}-6b"
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    c = model.config
    ids = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
    (tmp / "generation_config.json").write_text(json.dumps(  # ChatGLM2/3 have no bos id: the key is left out
        {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}, indent=2) + "\n")
    tensors = state if state is not None else prefix_state_dict(encoder)
    torch.save({name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}, tmp / WEIGHTS_FILE)
    if tokenizer_dir is not None:
        for name in dict.fromkeys(TOKENIZER_FILES + GLM2_TOKENIZER_FILES):  # whichever the base has
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    replace_dir(tmp, out)
    return out
