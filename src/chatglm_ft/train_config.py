"""Training settings: one dataclass whose field names are the `chatglm-ft train` flags in snake_case.

Defaults are the original chatglm6b_ft project's (`num_train_epochs=3, per_device_train_batch_size=32, learning_rate=2e-5,
warmup_steps=500, weight_decay=0.01`, LoRA r=8, alpha=32, dropout=0.1 on query_key_value).
No torch import here, so the CLI's `--help` stays fast; the loop lives in `train.py`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ChatGLMError

FINETUNING_TYPES = ("lora", "full", "ptuning")
BATCHINGS = ("grouped", "random", "packed")  # data.LengthGroupedBatches by length or not; packing.PackedBatches
REPORTERS = ("jsonl", "tensorboard")
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # the Linears of a ChatGLM-6B layer


@dataclass
class TrainConfig:
    model: str | None = None
    data: list[str] = field(default_factory=list)
    output_dir: str = "runs/chatglm-lora"
    template: str = "chatglm"
    data_format: str = "auto"
    columns: dict[str, str] | None = None
    last_turn_only: bool = False
    finetuning_type: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target: list[str] = field(default_factory=lambda: ["query_key_value"])
    pre_seq_len: int = 128  # P-Tuning v2 (--finetuning-type ptuning): THUDM's recipe uses 128
    prefix_projection: bool = False
    quantize: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    batching: str = "grouped"
    pack_length: int = 0  # --batching packed: tokens per row; 0: max_source_length + max_target_length
    learning_rate: float = 2e-5
    warmup_steps: int = 500
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 500
    eval_steps: int = 500
    save_total_limit: int = 2
    seed: int = 42
    max_source_length: int = 512
    max_target_length: int = 512
    val_size: float = 0.0
    gradient_checkpointing: bool = False
    fsdp: bool = False
    compile: bool = False  # torch.compile each layer (CUDA only)
    on_bad_row: str = "skip"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from a mapping whose keys are field names (kebab-case accepted); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalised) - names)
        if unknown:
            raise ChatGLMError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys are the `chatglm-ft train` flags")
        if isinstance(normalised.get("data"), str):
            normalised["data"] = [normalised["data"]]
        for key in ("lora_target", "report_to"):
            if isinstance(normalised.get(key), str):
                normalised[key] = split_list(normalised[key])
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in normalised.items():
            normalised[key] = coerce(key, value, types[key], source)
        return cls(**normalised).validate()

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Read a YAML or JSON file of the same keys; `overrides` (e.g. command-line flags) win."""
        return cls.from_dict({**read_config_file(path), **overrides}, source=str(path))

    def validate(self) -> "TrainConfig":
        """Check values a user can get wrong; returns self."""
        def bad(message: str) -> ChatGLMError:
            return ChatGLMError(message)

        if self.finetuning_type not in FINETUNING_TYPES:
            raise bad(f"finetuning_type must be one of {', '.join(FINETUNING_TYPES)}, not {self.finetuning_type!r}")
        if self.finetuning_type == "full" and self.quantize:
            raise bad("full fine-tuning needs float weights; drop --quantize (QLoRA is --finetuning-type lora)")
        if self.finetuning_type == "ptuning" and self.pre_seq_len < 1:
            raise bad(f"pre_seq_len must be at least 1, not {self.pre_seq_len}")
        if self.fsdp and self.quantize:
            raise bad("--fsdp shards float weights; a --quantize base cannot be sharded (drop one of the two)")
        if self.quantize not in (None, "int8", "int4"):
            raise bad(f"quantize must be int8 or int4, not {self.quantize!r}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "lora_r", "max_source_length", "max_target_length"):
            if int(getattr(self, name)) < 1:
                raise bad(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise bad("nothing to train: set --max-steps > 0 or --num-train-epochs > 0")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise bad("learning_rate must be > 0 and warmup_steps, weight_decay, max_grad_norm >= 0")
        targets = [t for item in self.lora_target for t in split_list(item)]
        if targets != ["all"] and (not targets or set(targets) - set(LORA_TARGETS)):
            unknown = ", ".join(sorted(set(targets) - set(LORA_TARGETS))) or "(none)"
            raise bad(f"unknown LoRA target {unknown}; choose from {', '.join(LORA_TARGETS)} or 'all'")
        if not 0 <= self.lora_dropout < 1:
            raise bad(f"lora_dropout must be in [0, 1), not {self.lora_dropout}")
        if self.val_size < 0 or (self.val_size >= 1 and float(self.val_size) != int(self.val_size)):
            raise bad(f"val_size must be a fraction in [0, 1) or a whole count, not {self.val_size}")
        unknown = sorted(set(self.report_to) - set(REPORTERS) - {"none"})
        if unknown:
            raise bad(f"report_to: unknown {', '.join(unknown)}; choose from {', '.join(REPORTERS)} or none")
        if self.resume and self.overwrite:
            raise bad("--resume continues the earlier run and --overwrite replaces it: pass only one")
        if self.batching not in BATCHINGS:
            raise bad(f"batching must be one of {', '.join(BATCHINGS)}, not {self.batching!r}")
        if self.pack_length < 0:
            raise bad(f"pack_length must be 0 (max_source_length + max_target_length) or more, not {self.pack_length}")
        if self.on_bad_row not in ("skip", "error"):
            raise bad(f"on_bad_row must be skip or error, not {self.on_bad_row!r}")
        return self

    @property
    def packed_row_length(self) -> int:
        """Tokens per packed row (--batching packed): pack_length, or room for the longest example by default."""
        return self.pack_length or self.max_source_length + self.max_target_length

    @property
    def validation_size(self) -> float | int:
        """val_size as data.split_validation wants it: a fraction below 1, otherwise a count."""
        return float(self.val_size) if self.val_size < 1 else int(self.val_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path | None  # the final adapter (LoRA) or prefix (P-Tuning); None for full fine-tuning
    final_loss: float  # mean training loss over the last logging window
    losses: list[tuple[int, float]]  # (optimizer step, training loss) for every step, resumed runs included
    eval_losses: list[tuple[int, float]]
    tokens_per_second: float  # non-padding tokens per second, after the first (warm-up) step
    seconds: float
    steps: int
    model_dir: Path | None = None  # the final full model (full fine-tuning); None for LoRA
    peak_memory_bytes: int | None = None  # CUDA peak allocated memory, None on CPU
    padding_fraction: float | None = None  # share of the batches' token positions that were padding (all processes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("output_dir", "adapter_dir", "model_dir"):
            out[key] = str(out[key]) if out[key] is not None else None
        return out


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


SCALAR_TYPES = {"int": int, "float": float, "bool": bool}


def coerce(key: str, value: Any, type_name: str, source: str) -> Any:
    """A scalar setting as its field's type. YAML reads `2e-4` (no dot) as a string: accept numbers written as text,
    refuse anything else with one line naming the key."""
    kind = SCALAR_TYPES.get(type_name)
    if kind is None or value is None:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ChatGLMError(f"{source}: {key.replace('_', '-')} must be true or false, not {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ChatGLMError(f"{source}: {key.replace('_', '-')} must be a number, not {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ChatGLMError(f"{source}: {key.replace('_', '-')} must be a number, not {value!r}")
    if number != number or number in (float("inf"), float("-inf")):
        raise ChatGLMError(f"{source}: {key.replace('_', '-')} must be a finite number, not {value!r}")
    if kind is int:
        if number != int(number):
            raise ChatGLMError(f"{source}: {key.replace('_', '-')} must be a whole number, not {value!r}")
        return int(number)
    return number


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ChatGLMError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as e:
        raise ChatGLMError(f"{path}: cannot parse ({e})")
    except Exception as e:  # yaml.YAMLError, without importing yaml for JSON files
        if type(e).__module__.startswith("yaml"):
            raise ChatGLMError(f"{path}: cannot parse YAML ({str(e).splitlines()[0]})")
        raise
    if not isinstance(values, dict):
        raise ChatGLMError(f"{path}: expected a mapping of training settings")
    return values
