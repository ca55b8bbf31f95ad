"""`chatglm-ft train`: LoRA / QLoRA / full fine-tuning. Flags are TrainConfig's fields in kebab-case
(the transformers TrainingArguments names where one exists); `--config FILE` (YAML or JSON) supplies
the same keys, and flags given on the command line win."""
from __future__ import annotations

import argparse
import dataclasses

from ..train_config import TrainConfig, split_list

HELP = {
    "model": "ChatGLM-6B checkpoint directory (default: $CHATGLM_FT_MODEL)",
    "data": "training data: JSON/JSONL file, directory or glob (repeatable); Alpaca, ChatGLM-Tuning, HC3, chat formats",
    "output_dir": "where the adapter, checkpoints and logs go",
    "template": "prompt template: chatglm (chat format with history) or alpaca (Instruction:/Input:/Answer:)",
    "data_format": "data format, or auto to detect it per file",
    "columns": "rename fields, e.g. prompt=question,response=answer",
    "last_turn_only": "learn only the last assistant turn of multi-turn records",
    "finetuning_type": "lora (adapter only), ptuning (P-Tuning v2 prefix only) or full (every weight)",
    "pre_seq_len": "P-Tuning: prefix length in key/value positions per layer",
    "prefix_projection": "P-Tuning: compute the prefix through a two-layer MLP (THUDM's prefix_projection)",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha (scale = alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "lora_target": "modules to adapt: comma list of query_key_value, dense, dense_h_to_4h, dense_4h_to_h, or all",
    "quantize": "QLoRA: quantize the frozen base to int8 or int4 while loading",
    "dtype": "auto: bfloat16 autocast on GPUs that support it (else float16), float32 on CPU",
    "device": "cpu, cuda, cuda:N (auto: cuda when available; under torchrun each process takes its LOCAL_RANK GPU)",
    "num_train_epochs": "passes over the data (fractions allowed) when --max-steps is not set",
    "max_steps": "optimizer steps to run (overrides --num-train-epochs when > 0)",
    "per_device_train_batch_size": "examples per process per micro-batch (--batching packed: packed rows)",
    "per_device_eval_batch_size": "examples per process per evaluation batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "batching": "grouped: batches of similar lengths, little padding; random: plainly shuffled batches; packed: "
                "several examples per row of --pack-length tokens, each masked to itself (almost no padding; "
                "--per-device-train-batch-size then counts rows)",
    "pack_length": "--batching packed: tokens per row (0: --max-source-length + --max-target-length)",
    "learning_rate": "peak learning rate (the original chatglm6b_ft project's 2e-5 suits full fine-tuning; LoRA usually needs 1e-4..1e-3)",
    "warmup_steps": "linear warmup steps, then linear decay to 0",
    "weight_decay": "AdamW weight decay (not on biases and LayerNorm weights)",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "logging_steps": "log the loss every N steps",
    "save_steps": "write a resumable checkpoint every N steps (0: only the final weights)",
    "eval_steps": "evaluate on the held-out split every N steps",
    "save_total_limit": "keep only the newest N checkpoints (0: all)",
    "seed": "seed for the adapter's initialisation, data order, split and dropout",
    "max_source_length": "prompt tokens at most (the end is kept)",
    "max_target_length": "answer tokens at most",
    "val_size": "held-out split: a fraction (0.05) or a count (200); 0: none",
    "gradient_checkpointing": "recompute activations in backward: much less memory, about 30%% slower",
    "compile": "on a GPU, compile each layer with torch.compile (a minute at start; faster small batches)",
    "fsdp": "under torchrun, shard weights, gradients and optimizer state over the processes (FSDP2) instead of DDP",
    "on_bad_row": "skip bad data rows (reported with line numbers) or stop at the first (error)",
    "resume": "continue from the newest checkpoint in --output-dir, exactly as if never stopped",
    "overwrite": "replace an earlier run in --output-dir (moved aside, removed once the new run completes)",
    "progress": "show the progress bar",
    "report_to": "comma list of jsonl, tensorboard (or none)",
}
CHOICES = {
    "template": ["chatglm", "alpaca"], "finetuning_type": ["lora", "ptuning", "full"], "quantize": ["int8", "int4"],
    "dtype": ["auto", "float32", "float16", "bfloat16"], "on_bad_row": ["skip", "error"],
    "batching": ["grouped", "random", "packed"],
    "data_format": ["auto", "alpaca", "chatglm-tuning", "hc3", "chat", "messages"],
}
SCALARS = {"int": int, "float": float, "str": str, "str | None": str}


def parse_columns(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in split_list(text)]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError("expected field=name pairs, e.g. prompt=question,response=answer")
    return {key.strip(): value.strip() for key, value in pairs}


def add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field. Defaults are SUPPRESSed so a --config file's values survive
    unless the flag is actually given."""
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file with the same keys as the flags")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = HELP[f.name] + (f" (default: {shown})" if shown not in (None, "", False, []) else "")
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "data":
            kwargs.update(action="append", metavar="PATH")
        elif f.type == "list[str]":
            kwargs.update(type=split_list, metavar="A,B")
        elif f.name == "columns":
            kwargs.update(type=parse_columns, metavar="FIELD=NAME,...")
        elif f.name == "val_size":
            kwargs.update(type=float, metavar="N")
        else:
            kwargs["type"] = SCALARS[f.type]
            if f.name in CHOICES:
                kwargs["choices"] = CHOICES[f.name]
            else:
                kwargs["metavar"] = {"int": "N", "float": "X"}.get(f.type, "DIR" if f.name.endswith(("model", "dir")) else None)
        p.add_argument(flag, **kwargs)


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune with LoRA, QLoRA (--quantize), P-Tuning v2 or fully; torchrun for several GPUs",
        description="Fine-tune ChatGLM-6B on instruction or chat data. Writes OUTPUT_DIR/adapter (PEFT layout), "
                    "OUTPUT_DIR/prefix (P-Tuning, THUDM's layout) or OUTPUT_DIR/model, resumable checkpoints and a JSONL log. Several GPUs: "
                    "torchrun --nproc_per_node N -m chatglm_ft train ...")
    add_train_args(p)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice; 1 is fastest for tiny models such as the"
                        " demo's on a busy machine)")
    p.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    import os

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.config:
        config = TrainConfig.from_file(args.config, **given)
    else:
        config = TrainConfig.from_dict(given, source="command line")
    if config.model is None and os.environ.get("CHATGLM_FT_MODEL"):
        config.model = os.environ["CHATGLM_FT_MODEL"]
    return config


def run(args: argparse.Namespace) -> int:
    from ..errors import ChatGLMError
    from ..train import train

    if args.threads is not None:
        if args.threads < 1:
            raise ChatGLMError(f"--threads must be at least 1, not {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    train(config_from_args(args))
    return 0
