"""Reading and writing checkpoint directories in the original layout (SPEC.md section 1).

Loading is shard by shard: the model is built on `meta`, each shard is memory-mapped, each
tensor is converted to the target dtype/device and assigned, then the shard is released. Peak
host memory stays about one copy of the weights in the target dtype (none when loading to a GPU).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import ChatGLMConfig
from .config_glm2 import ChatGLM2Config
from .errors import CheckpointError
from .outputs import share_like_other_files, writing
from .tokenizer import TOKENIZER_FILES as GLM_TOKENIZER_FILES
from .tokenizer_glm2 import TOKENIZER_FILES as GLM2_TOKENIZER_FILES

# Every family's tokenizer files: a checkpoint directory holds those of its own family.
TOKENIZER_FILES = tuple(dict.fromkeys(GLM_TOKENIZER_FILES + GLM2_TOKENIZER_FILES))

IGNORED_KEY = re.compile(r".*\.(rotary_emb|rotary_pos_emb)\.inv_freq$")  # recomputed, never read
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def expected_shapes(config: ChatGLMConfig | ChatGLM2Config) -> dict[str, tuple[int, ...]]:
    """Every parameter name of a float checkpoint with its shape: the explicit key table."""
    if isinstance(config, ChatGLM2Config):
        return expected_shapes_glm2(config)
    H, I, V = config.hidden_size, config.inner_hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.word_embeddings.weight": (V, H)}
    for n in range(config.num_layers):
        p = f"transformer.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "input_layernorm.bias": (H,),
            p + "attention.query_key_value.weight": (3 * H, H), p + "attention.query_key_value.bias": (3 * H,),
            p + "attention.dense.weight": (H, H), p + "attention.dense.bias": (H,),
            p + "post_attention_layernorm.weight": (H,), p + "post_attention_layernorm.bias": (H,),
            p + "mlp.dense_h_to_4h.weight": (I, H), p + "mlp.dense_h_to_4h.bias": (I,),
            p + "mlp.dense_4h_to_h.weight": (H, I), p + "mlp.dense_4h_to_h.bias": (H,),
        })
    shapes["transformer.final_layernorm.weight"] = (H,)
    shapes["transformer.final_layernorm.bias"] = (H,)
    shapes["lm_head.weight"] = (V, H)
    return shapes


def expected_shapes_glm2(config: ChatGLM2Config) -> dict[str, tuple[int, ...]]:
    """The key table of a ChatGLM2/3 checkpoint (SPEC.md II.2); `rotary_pos_emb.inv_freq` is IGNORED_KEY."""
    H, F, V = config.hidden_size, config.ffn_hidden_size, config.padded_vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"transformer.embedding.word_embeddings.weight": (V, H)}
    for n in range(config.num_layers):
        p = f"transformer.encoder.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (H,),
            p + "self_attention.query_key_value.weight": (q + 2 * kv, H),
            p + "self_attention.dense.weight": (H, q),
            p + "post_attention_layernorm.weight": (H,),
            p + "mlp.dense_h_to_4h.weight": (2 * F, H),
            p + "mlp.dense_4h_to_h.weight": (H, F),
        })
        if config.add_qkv_bias:
            shapes[p + "self_attention.query_key_value.bias"] = (q + 2 * kv,)
    shapes["transformer.encoder.final_layernorm.weight"] = (H,)
    shapes["transformer.output_layer.weight"] = (V, H)
    return shapes


# -- finding the shards ----------------------------------------------------------------------------
def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in index order; a missing shard is an error."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid index file ({e}); restore it from the model repository")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map is not an object; restore it from the model repository")
            files = sorted(set(weight_map.values()), key=str)
            for f in files:
                check_shard_name(path, index, f)
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise CheckpointError(
                    f"{path}: missing shard {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + f" listed in {index_name}; download it again"
                )
            return [path / f for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).exists():
            return [path / single]
    loose = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if loose:
        return loose
    raise CheckpointError(
        f"{path}: no weights found (expected pytorch_model*.bin or *.safetensors, with an index when sharded)"
    )


def check_shard_name(path: Path, index: Path, name: object) -> None:
    """An index entry must name a weight file inside the checkpoint folder (never ../../etc/passwd)."""
    if not isinstance(name, str) or not name.endswith((".safetensors", ".bin")):
        raise CheckpointError(f"{index}: lists {name!r}, which is not a weight file (.safetensors or .bin);"
                              " restore the index from the model repository")
    root = path.resolve()
    if Path(name).is_absolute() or root not in (path / name).resolve().parents:
        raise CheckpointError(f"{index}: lists {name!r}, outside the checkpoint folder; refusing to read it")


def loading_problem(error: BaseException) -> str:
    """The first line of a loading error, without torch's advice to load untrusted files with weights_only=False."""
    text = str(error).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds Python objects besides tensors, and loading those could run code"
    return text.splitlines()[0][:300] if text else type(error).__name__


def read_shard(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one shard, memory-mapped; corrupt files raise CheckpointError naming the file."""
    hint = "the file is truncated or corrupt; download it again"
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors import SafetensorError

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: cannot read safetensors ({e}); {hint}")
        return
    try:
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:
        problem = loading_problem(e)
        fix = "use a checkpoint from a source you trust" if "could run code" in problem else hint
        raise CheckpointError(f"{file}: cannot read ({problem}); {fix}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict")
    yield from state.items()
    del state


# -- loading -------------------------------------------------------------------------------------
TensorHandler = Callable[[str, torch.Tensor], bool]


def load_weights(
    model: torch.nn.Module,
    path: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    expected: dict[str, tuple[int, ...]],
    place: Callable[[str, torch.Tensor], None] | None = None,
) -> None:
    """Assign every tensor of the checkpoint into `model` (built on meta), checking names and shapes.

    `place(name, tensor)` overrides how one tensor lands in the model (quantization hooks in here);
    by default the tensor is converted to `dtype` (floating tensors only) and `device` and assigned.
    """
    seen: set[str] = set()
    lm_head: torch.Tensor | None = None
    for file in weight_files(path):
        for name, tensor in read_shard(file):
            if IGNORED_KEY.match(name):
                continue
            if name.startswith("transformer.prefix_encoder."):
                raise CheckpointError(
                    f"{file}: holds a P-Tuning v2 prefix encoder ({name}) inside a full checkpoint; load the base model with"
                    " --model and a prefix-only directory (THUDM's layout) with --ptuning"
                )
            if name not in expected:
                raise CheckpointError(f"{file}: unexpected tensor {name}; config.json and weights do not belong"
                                      " to the same ChatGLM generation, or the file is not a ChatGLM checkpoint")
            if tuple(tensor.shape) != tuple(expected[name]):
                raise CheckpointError(
                    f"{file}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name])};"
                    " config.json and weights do not belong together"
                )
            if name in seen:
                raise CheckpointError(f"{file}: {name} appears in two shards")
            seen.add(name)
            if name == "lm_head.weight":
                lm_head = tensor.to(dtype) if tensor.is_floating_point() else tensor
                continue  # placed last, once the embeddings are known, to decide whether to tie
            if place is not None:
                place(name, tensor)
            else:
                assign_tensor(model, name, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None, copy=True))
    missing = sorted(set(expected) - seen - {"lm_head.weight"})
    if missing:
        raise CheckpointError(
            f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}; a shard is incomplete or the config is wrong"
        )
    if not hasattr(model, "tie_lm_head"):
        return  # ChatGLM2/3: the output layer is an ordinary tensor, never tied to the embeddings
    embeddings = model.get_parameter("transformer.word_embeddings.weight")
    # (compared on the host: no second 1 GB copy on the GPU; quantized embeddings never equal a float lm_head;
    # embeddings kept in float16 (quantize.py) are compared in float16, as lm_head would be stored)
    comparable = lm_head is not None and (lm_head.dtype == embeddings.dtype
                                          or lm_head.is_floating_point() and embeddings.is_floating_point())
    if lm_head is None or (comparable and torch.equal(lm_head.to(embeddings.dtype), embeddings.data.to(lm_head.device))):
        # The released checkpoint stores lm_head equal to the embeddings: share one tensor (saves ~1 GB).
        model.tie_lm_head()
    elif place is not None:
        place("lm_head.weight", lm_head)
    else:
        assign_tensor(model, "lm_head.weight", lm_head.to(device=device, dtype=dtype, copy=True))


def assign_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, attr, value)


# -- saving --------------------------------------------------------------------------------------
def save_checkpoint(
    state: dict[str, torch.Tensor],
    config: ChatGLMConfig,
    out: Path,
    *,
    tokenizer_dir: Path | None,
    max_shard_bytes: int = 2 * 1024**3,
    copy_code: bool = True,
) -> None:
    """Write safetensors shards + index + config + tokenizer files; the directory appears atomically.

    With `copy_code`, the `*.py` files of `tokenizer_dir` (THUDM's modeling/tokenization code) come along and
    config.json keeps its `auto_map`, so THUDM's own loading code (trust_remote_code) opens the result too."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp-partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with writing(out, tmp):
        _write_checkpoint(state, config, tmp, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes,
                          copy_code=copy_code)
    share_like_other_files(tmp)
    replace_dir(tmp, out)


def _write_checkpoint(state: dict[str, torch.Tensor], config: ChatGLMConfig, tmp: Path, *, tokenizer_dir: Path | None,
                      max_shard_bytes: int, copy_code: bool) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        # safetensors refuses shared storage (tied lm_head): every tensor gets its own contiguous copy.
        shards[-1][name] = tensor.detach().to("cpu").contiguous().clone()
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / file), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    (tmp / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save(tmp)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        for code in sorted(Path(tokenizer_dir).glob("*.py")) if copy_code else ():
            shutil.copy2(code, tmp / code.name)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished directory into place; an existing `out` is replaced only once the new one is complete."""
    if out.exists():
        old = out.with_name(out.name + ".tmp-old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def save_model(model: torch.nn.Module, out: Path, *, tokenizer_dir: Path | None, dtype: torch.dtype | None = None) -> None:
    """Save a float model in the original layout (safetensors), e.g. after merging an adapter."""
    state = {}
    for name, tensor in model.state_dict().items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor
    config = model.config
    if dtype is not None:
        config.torch_dtype = str(dtype).removeprefix("torch.")
    save_checkpoint(state, config, out, tokenizer_dir=tokenizer_dir)
