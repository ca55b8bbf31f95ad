"""LoRA adapters through PEFT, on our model with the original parameter paths (SPEC.md section 6).

Because the paths are the original ones (`transformer.layers.N.attention.query_key_value`), an
adapter saved here has the keys `base_model.model.transformer.layers.N.attention.query_key_value.
lora_A.weight` that PEFT writes for the original model, so adapters move freely between this
package, `peft.PeftModel.from_pretrained` on the original implementation and other ChatGLM-6B
tools (ChatGLM-Tuning, ChatGLM-Efficient-Tuning, LLaMA-Factory).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .checkpoint import loading_problem, replace_dir
from .errors import ChatGLMError
from .outputs import share_like_other_files, writing

DEFAULT_TARGET = ("query_key_value",)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def layer_linear_names(model: nn.Module) -> list[str]:
    """Names (last path component) of every Linear inside the transformer layers, e.g. query_key_value."""
    names: list[str] = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if "layers" not in parts or not isinstance(module, nn.Linear) or any(p.startswith("lora_") for p in parts):
            continue
        leaf = parts[-2] if parts[-1] == "base_layer" else parts[-1]  # a Linear already wrapped by PEFT
        if leaf not in names:
            names.append(leaf)
    return names


def resolve_target(model: nn.Module, target: str | Sequence[str]) -> list[str]:
    """The target module names for `--lora-target`: names, a comma list, or "all" (every Linear in the layers)."""
    if isinstance(target, str):
        target = [target]
    names = [t.strip() for item in target for t in item.split(",") if t.strip()]
    available = layer_linear_names(model)
    if names == ["all"]:
        return available
    unknown = [n for n in names if n not in available]
    if not names or unknown:
        raise ChatGLMError(
            f"unknown LoRA target {', '.join(unknown) or '(none)'}; choose from {', '.join(available)} or 'all'"
        )
    return names


def apply_lora(model: nn.Module, *, r: int = 8, alpha: int = 32, dropout: float = 0.1,
               target: str | Sequence[str] = DEFAULT_TARGET):
    """Wrap `model` in a trainable `peft.PeftModel` with fresh LoRA weights (B = 0: outputs unchanged).

    Only the adapter trains; the base weights are frozen in whatever dtype they have (float16,
    bfloat16, int8/int4 for QLoRA). PEFT keeps the adapter weights in float32 over a 16-bit base.
    """
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ChatGLMError(f"bad LoRA settings r={r} alpha={alpha} dropout={dropout}: need r >= 1, alpha > 0, 0 <= dropout < 1")
    target_modules = resolve_target(model, target)  # before importing PEFT (seconds): typos fail at once
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none")
    training = model.training
    return get_peft_model(model, config).train(training)  # PEFT switches to train mode; keep the caller's


def save_adapter(peft_model, out: str | Path, *, base_model: str | Path | None = None,
                 state_dict: dict | None = None) -> Path:
    """Save the adapter in the PEFT layout (adapter_config.json + adapter_model.safetensors), atomically.

    `state_dict`: the model's weights when its own are not plain tensors (FSDP shards gathered by the caller)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp-partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = str(base_model) if base_model else None
    # Embeddings never train here; "auto" would probe the base config with transformers-only calls.
    with writing(out, tmp):
        peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False, state_dict=state_dict)
    share_like_other_files(tmp)
    replace_dir(tmp, out)
    return out


# -- loading adapters ----------------------------------------------------------------------------------
def adapter_dir(path: str | Path) -> Path:
    """The adapter directory for `path`: the path itself, or its `adapter/` (a `chatglm-ft train` output dir)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ChatGLMError(f"{path}: no such adapter directory")
    if not (path / ADAPTER_CONFIG).exists() and (path / "adapter" / ADAPTER_CONFIG).exists():
        path = path / "adapter"
    if not (path / ADAPTER_CONFIG).exists():
        raise ChatGLMError(f"{path}: no {ADAPTER_CONFIG}; pass a LoRA adapter directory in the PEFT layout")
    if not any((path / name).exists() for name in ADAPTER_WEIGHTS):
        raise ChatGLMError(f"{path}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return path


def read_adapter_config(path: Path):
    """A LoraConfig from adapter_config.json, tolerant of files written by other tools and PEFT versions.

    Keys this PEFT does not know (old `merge_weights`, newer options) are dropped; `task_type` is
    cleared because our model is not a transformers model (PEFT's CAUSAL_LM wrapper expects one).
    """
    from peft import LoraConfig

    try:
        raw = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatGLMError(f"{path / ADAPTER_CONFIG}: not valid JSON ({e})")
    check_adapter_config(raw, path / ADAPTER_CONFIG)
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise ChatGLMError(f"{path}: a {raw.get('peft_type')} adapter; chatglm-ft applies LoRA adapters only")
    if raw.get("enable_lora"):  # peft < 0.3 MergedLinear: LoRA on a subset of q/k/v, another weight layout
        raise ChatGLMError(f"{path}: uses the pre-0.3 PEFT `enable_lora` layout; convert it with a current PEFT first")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    values = {k: v for k, v in raw.items() if k in known and k not in ("peft_type", "task_type")}
    values["inference_mode"] = True
    try:
        return LoraConfig(**values)
    except (TypeError, ValueError) as e:
        raise ChatGLMError(f"{path / ADAPTER_CONFIG}: {loading_problem(e)}; save the adapter again") from None


def check_adapter_config(raw: object, file: Path) -> None:
    """The keys that shape the LoRA layers, with the types PEFT needs (a wrong type would fail deep inside PEFT)."""
    if not isinstance(raw, dict):
        raise ChatGLMError(f"{file}: expected a JSON object")

    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

    checks = {
        "r": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "lora_alpha": lambda v: number(v) and v > 0,
        "lora_dropout": lambda v: number(v) and 0 <= v < 1,
        "target_modules": lambda v: v is None or isinstance(v, str) or (
            isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "fan_in_fan_out": lambda v: isinstance(v, bool),
        "bias": lambda v: v in ("none", "all", "lora_only"),
    }
    wanted = {"r": "a whole number >= 1", "lora_alpha": "a number > 0", "lora_dropout": "a number in [0, 1)",
              "target_modules": "a list of module names", "fan_in_fan_out": "true or false",
              "bias": "'none', 'all' or 'lora_only'"}
    for key, ok in checks.items():
        if key in raw and not ok(raw[key]):
            raise ChatGLMError(f"{file}: {key} is {raw[key]!r}, expected {wanted[key]}; save the adapter again")


def apply_adapters(model: nn.Module, adapters: str | Path | Sequence[str | Path]) -> nn.Module:
    """Apply one or more saved LoRA adapters, unmerged; several adapters add up.

    Returns the model itself (same class, LoRA layers inside its Linears), so generation, chat,
    serving and evaluation run unchanged; `merge_adapter` folds the adapters into the weights.
    Adapter weights take the base model's dtype (no float32 round trip per layer at inference).
    Every adapter tensor must land in the model and every LoRA layer must get its weights:
    an adapter for another model fails loudly instead of running half-applied.
    """
    import pickle

    from peft import PeftModel
    from safetensors import SafetensorError

    paths = [adapters] if isinstance(adapters, (str, Path)) else list(adapters)
    if not paths:
        return model
    names = [f"adapter{i}" for i in range(len(paths))]
    peft_model = None
    for name, path in zip(names, paths):
        path = adapter_dir(path)
        config = read_adapter_config(path)
        try:
            if peft_model is None:
                peft_model = PeftModel(model, config, adapter_name=name, autocast_adapter_dtype=False)
            else:
                peft_model.add_adapter(name, config, autocast_adapter_dtype=False)
            result = peft_model.load_adapter(str(path), adapter_name=name, autocast_adapter_dtype=False,
                                             torch_device=str(_device_of(model)))
        except (ValueError, RuntimeError, KeyError) as e:
            if "weights_only" in str(e) or "Weights only" in str(e) or type(e).__name__ == "SafetensorError":
                raise ChatGLMError(f"{path}: cannot read the adapter weights ({loading_problem(e)});"
                                   " the file is truncated, corrupt or unsafe: save or download it again") from None
            raise ChatGLMError(f"{path}: adapter does not fit this model ({loading_problem(e)})") from None
        except (SafetensorError, pickle.UnpicklingError, EOFError, OSError) as e:  # an unreadable file
            raise ChatGLMError(f"{path}: cannot read the adapter weights ({loading_problem(e)});"
                               " the file is truncated, corrupt or unsafe: save or download it again") from None
        bad = list(result.unexpected_keys) or list(result.missing_keys)
        if bad:
            what = "holds tensors this model lacks" if result.unexpected_keys else "lacks weights for"
            raise ChatGLMError(f"{path}: adapter {what} {bad[0]} ({len(bad)} in all); is it for ChatGLM-6B?")
    peft_model.base_model.set_adapter(names)
    model = peft_model.get_base_model()
    model.requires_grad_(False)
    return model.eval()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- merging ---------------------------------------------------------------------------------------
def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every active LoRA adapter into its base weight and drop the LoRA layers.

    Accepts a PeftModel or a model returned by `apply_adapters`; returns the plain model, whose
    state dict has exactly the original keys. Refuses quantized base weights, and checks the merged
    weights for NaN/Inf (PEFT's safe_merge) so a broken adapter never reaches a saved checkpoint.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        if type(base) is not nn.Linear:  # Int8Linear/Int4Linear subclass nn.Linear but hold integer weights
            raise ChatGLMError(
                f"cannot merge into the quantized layer {name}; load the base model unquantized (no --quantize), "
                "merge, then quantize the merged checkpoint"
            )
        try:
            module.merge(safe_merge=True)
        except ValueError as e:  # safe_merge found NaN/Inf
            raise ChatGLMError(f"merging the adapter into {name} gives NaN/Inf weights ({e}); the adapter is broken")
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, base)
    _forget_peft(model)
    return model


def _forget_peft(model: nn.Module) -> None:
    """PEFT leaves its config on the base model; without LoRA layers it would only confuse a later wrap."""
    if "peft_config" in model.__dict__:
        del model.peft_config


def remove_adapters(model: nn.Module) -> nn.Module:
    """Drop every LoRA layer without merging: the base model exactly as it was (before/after comparisons)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.get_base_layer())
    _forget_peft(model)
    return model
