"""The training loop: LoRA (through PEFT), P-Tuning v2 (ptuning.py) or full fine-tuning, in one process or under torchrun (DDP, or FSDP: fsdp.py).

    train(TrainConfig(model="chatglm-6b", data=["alpaca.json"], learning_rate=1e-4))

One optimizer step = `gradient_accumulation_steps` micro-batches on every process. The loss of
a step is the mean over all its target tokens, on all processes together: each micro-batch's
mean loss is weighted by its share of the step's tokens (counted before the forward passes), so
N processes with batch b give the same gradients as one process with batch N*b, and
accumulation gives the same gradients as one big batch.

Output directory:
    adapter/                  final LoRA adapter (PEFT layout)    | prefix/ for P-Tuning | model/ for full fine-tuning
    checkpoint-<step>/        adapter/, prefix/ or model/ + trainer_state.pt (optimizer, scheduler, RNG, data position)
    train_log.jsonl           one line per logging step / evaluation
    train_results.json        the TrainResult
    tensorboard/              when tensorboard is installed and report_to has it
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .api import resolve_device
from .checkpoint import read_shard, replace_dir, save_checkpoint, weight_files
from .data import (IGNORE_INDEX, Example, LengthGroupedBatches, collate, default_cache_dir, load_records,
                   split_validation, tokenize_records)
from .errors import ChatGLMError, DataError
from .outputs import check_output_dir, discard, move_aside, writing
from .lora import apply_lora, save_adapter
from .packing import PackedBatches, collate_packed
from .ptuning import add_prefix_encoder, prefix_encoder_of, save_prefix
from .train_config import TrainConfig, TrainResult

__all__ = ["TrainConfig", "TrainResult", "train"]

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
RESULTS_FILE = "train_results.json"
PREFIX_DIR = "prefix"  # P-Tuning output, in THUDM's layout


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- processes ---------------------------------------------------------------------------------------
@dataclass
class Processes:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_processes(device: str) -> Processes:
    """Join the torchrun job if there is one: NCCL with one GPU per process, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        target = resolve_device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())  # compare equal to model.device
        return Processes(0, 1, target)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and str(device) in ("auto", "cuda")
    if str(device).startswith("cuda:"):
        raise ChatGLMError("under torchrun each process takes the GPU of its LOCAL_RANK; pass --device cuda or auto")
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Processes(rank, world, target, owns)


# -- precision ---------------------------------------------------------------------------------------
def precision(config: TrainConfig, device: torch.device, model: nn.Module | None) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of the stored weights, autocast dtype or None).

    GPU: the frozen base is stored in the autocast dtype (bfloat16 where supported, else float16),
    so there is no float32 master copy of weights that never change; trained weights (LoRA, or all
    of them for full fine-tuning) stay float32 and the loss is float32. CPU: float32 throughout.
    """
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if config.dtype not in ("auto", *names):
        raise ChatGLMError(f"unknown dtype {config.dtype!r}; use auto, float32, float16 or bfloat16")
    if device.type != "cuda":
        stored = names.get(config.dtype, torch.float32)
        return (torch.float32 if config.finetuning_type == "full" else stored), None
    if config.dtype == "auto":
        given = model.dtype if model is not None and getattr(model, "dtype", None) in (torch.float16, torch.bfloat16) else None
        amp = given or (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    else:
        amp = names[config.dtype] if config.dtype != "float32" else None
    if config.finetuning_type == "full" or amp is None:
        return torch.float32, amp
    return amp, amp


# -- the training state that a checkpoint holds ------------------------------------------------------
@dataclass
class Run:
    """Everything the loop mutates; `checkpoint_state` / `restore` make it survive a kill."""

    config: TrainConfig
    procs: Processes
    net: nn.Module  # what forward runs through: DDP(PeftModel | model) or the model itself (FSDP-sharded or not)
    trained: nn.Module  # PeftModel (LoRA) or the model (full)
    base: nn.Module  # the ChatGLMForConditionalGeneration inside
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any
    sampler: LengthGroupedBatches | PackedBatches
    total_steps: int
    tokenizer_dir: Path | None
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    sharded: bool = False  # --fsdp with several processes: parameters are DTensor shards (fsdp.py)
    token_counts: tuple[int, int] = (0, 0)  # real tokens and batch positions of this run's steps, all processes

    @property
    def lora(self) -> bool:
        return self.config.finetuning_type == "lora"

    @property
    def ptuning(self) -> bool:
        return self.config.finetuning_type == "ptuning"


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_weights(run: Run, out: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """The trained weights in a directory other tools read: adapter/ (PEFT) or model/ (original layout).

    `weights`: the full tensors gathered from the FSDP shards (`gather_for_saving`); None: the model's own."""
    if run.lora:
        save_adapter(run.trained, out / "adapter", base_model=run.config.model, state_dict=weights)
    elif run.ptuning:
        save_prefix(run.base, out / PREFIX_DIR, state=weights, tokenizer_dir=run.tokenizer_dir)
    else:
        save_checkpoint(weights if weights is not None else run.base.state_dict(), run.base.config, out / "model",
                        tokenizer_dir=run.tokenizer_dir)


def gather_for_saving(run: Run, *, optimizer: bool) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """FSDP: (full weights, full optimizer state) on rank 0 in the single-process layout; (None, None)
    otherwise. A collective under FSDP: every process calls it."""
    if not run.sharded:
        return None, None
    from . import fsdp

    weights = fsdp.full_weights(run.trained, trainable_only=run.lora or run.ptuning)
    state = fsdp.full_optimizer_state(run.trained, run.optimizer) if optimizer else None
    return weights, state


def save_training_checkpoint(run: Run, output_dir: Path) -> None:
    """checkpoint-<step>/ with weights and trainer state, written to a temporary name and renamed into place."""
    weights, optimizer_state = gather_for_saving(run, optimizer=True)
    rng = rng_state(run.procs.device)
    rngs = [None] * run.procs.world
    if run.procs.world > 1:
        dist.all_gather_object(rngs, rng)  # dropout streams differ per process: keep each one
    else:
        rngs = [rng]
    if run.procs.main:
        out = output_dir / f"{CHECKPOINT_PREFIX}{run.step}"
        tmp = out.with_name(out.name + ".tmp-partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        with writing(out, tmp):
            write_training_checkpoint(run, tmp, weights, optimizer_state, rngs)
        replace_dir(tmp, out)
        prune_checkpoints(output_dir, run.config.save_total_limit)
    run.procs.barrier()


def write_training_checkpoint(run: Run, tmp: Path, weights, optimizer_state, rngs) -> None:
    """The files of checkpoint-<step>/, written into `tmp`."""
    save_weights(run, tmp, weights)
    torch.save({
        "step": run.step, "total_steps": run.total_steps, "world_size": run.procs.world,
        "finetuning_type": run.config.finetuning_type,
        "optimizer": optimizer_state if run.sharded else run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "sampler": run.sampler.state_dict(), "rng": rngs,
        "losses": run.losses, "eval_losses": run.eval_losses,
    }, tmp / STATE_FILE)
    (tmp / "trainer_state.json").write_text(json.dumps({
        "step": run.step, "total_steps": run.total_steps, "epoch": epoch_of(run.sampler),
        "losses": run.losses, "eval_losses": run.eval_losses, "config": run.config.to_dict(),
    }, indent=1))


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a half-written one has another name and no state file)."""
    found = []
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and (path / STATE_FILE).exists():
            found.append((int(suffix), path))
    return sorted(found)


def prune_checkpoints(output_dir: Path, limit: int) -> None:
    if limit > 0:
        for _, path in checkpoints(output_dir)[:-limit]:
            shutil.rmtree(path)


def restore(run: Run, path: Path) -> None:
    """Continue exactly where checkpoint `path` stopped: weights, optimizer, schedule, data position, RNG."""
    # mmap: every process reads the file; the optimizer state (2x the weights) stays in the page cache
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    if state["finetuning_type"] != run.config.finetuning_type:
        raise ChatGLMError(f"{path}: was a {state['finetuning_type']} run; resume it with the same --finetuning-type")
    if run.sharded:
        restore_sharded(run, path, state["optimizer"])
    elif run.lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(path / "adapter" / "adapter_model.safetensors", device=str(run.procs.device))
        result = set_peft_model_state_dict(run.trained, weights)
        if result.unexpected_keys:
            raise ChatGLMError(f"{path}: adapter does not match the LoRA settings (e.g. {result.unexpected_keys[0]});"
                               " resume with the same --lora-* flags")
    elif run.ptuning:
        restore_prefix(run, path)
    else:
        params = run.base.state_dict(keep_vars=True)
        for file in weight_files(path / "model"):
            for name, tensor in read_shard(file):
                params[name].data.copy_(tensor)
    if not run.sharded:
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state["scaler"] is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.sampler.load_state_dict(state["sampler"])
    if state["world_size"] == run.procs.world:
        set_rng_state(state["rng"][run.procs.rank], run.procs.device)
    else:
        info(f"note: checkpoint written by {state['world_size']} processes, resumed by {run.procs.world}:"
             " dropout masks will differ from an uninterrupted run")
        set_rng_state(state["rng"][0], run.procs.device)
    if state["total_steps"] != run.total_steps:
        info(f"note: the run now has {run.total_steps} steps, the checkpoint's had {state['total_steps']}:"
             " the learning-rate schedule changes from here on")
    run.step = state["step"]
    run.losses = [tuple(x) for x in state["losses"]]
    run.eval_losses = [tuple(x) for x in state["eval_losses"]]


def restore_sharded(run: Run, path: Path, optimizer_state: dict[str, Any]) -> None:
    """FSDP: every process reads the full weights of checkpoint `path` and keeps its shards."""
    from . import fsdp

    if run.lora:
        from safetensors.torch import load_file

        saved = load_file(path / "adapter" / "adapter_model.safetensors")
        adapter = f".{run.trained.active_adapter}."  # PEFT files drop the adapter name from the keys
        weights = {name: saved.get(name.replace(adapter, ".")) for name, p in run.trained.named_parameters()
                   if p.requires_grad}
        unmatched = sorted(set(saved) - {name.replace(adapter, ".") for name in weights}) + [
            name for name, tensor in weights.items() if tensor is None]
        if unmatched:
            raise ChatGLMError(f"{path}: adapter does not match the LoRA settings (e.g. {unmatched[0]});"
                               " resume with the same --lora-* flags")
    elif run.ptuning:
        weights = saved_prefix(run, path)
    else:
        weights = {name: tensor for file in weight_files(path / "model") for name, tensor in read_shard(file)}
    fsdp.load_full_weights(run.trained, weights, strict=not (run.lora or run.ptuning))
    fsdp.load_full_optimizer_state(run.trained, run.optimizer, optimizer_state)


def saved_prefix(run: Run, path: Path) -> dict[str, torch.Tensor]:
    """The prefix tensors of checkpoint `path`, checked against this run's --pre-seq-len / --prefix-projection."""
    from .ptuning import PREFIX_KEY, read_prefix

    try:
        encoder = read_prefix(path / PREFIX_DIR, run.base.config)
    except ChatGLMError as e:
        raise ChatGLMError(f"{e}; resume with the same --pre-seq-len and --prefix-projection") from None
    if encoder.shape != prefix_encoder_of(run.base).shape:
        raise ChatGLMError(f"{path}: prefix of pre_seq_len {encoder.pre_seq_len}, projection"
                           f" {str(encoder.shape.projection).lower()}; resume with the same --pre-seq-len and --prefix-projection")
    return {PREFIX_KEY + name: tensor for name, tensor in encoder.state_dict().items()}


def restore_prefix(run: Run, path: Path) -> None:
    params = run.base.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in saved_prefix(run, path).items():
            params[name].copy_(tensor)


# -- one optimizer step --------------------------------------------------------------------------------
def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken over: labels after the shift, not -100."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def train_step(run: Run, batches: list[dict[str, torch.Tensor]], autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over the micro-batches and one optimizer step; returns (local loss sum, global target count)."""
    procs, device = run.procs, run.procs.device
    counts = [target_count(b) for b in batches]
    total = procs.sum(torch.tensor(float(sum(counts)), device=device)).clamp(min=1.0)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    ddp = isinstance(run.net, nn.parallel.DistributedDataParallel)
    for k, (batch, count) in enumerate(zip(batches, counts)):
        last = k == len(batches) - 1
        # DDP all-reduces once per step; FSDP reduce-scatters every micro-batch (no full-size gradient kept)
        sync = run.net.no_sync() if ddp and not last else contextlib.nullcontext()
        with sync:
            with autocast:
                out = run.net(batch["input_ids"].to(device, non_blocking=True),
                              labels=batch["labels"].to(device, non_blocking=True), return_logits=False,
                              **packed_inputs(batch, device))
            # mean over this micro-batch -> its share of the step's token mean; x world because DDP/FSDP average
            loss = out.loss.float() * (count * procs.world) / total
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        loss_sum += out.loss.detach().float() * count
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    trainable = [p for group in run.optimizer.param_groups for p in group["params"]]
    if run.config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable, run.config.max_grad_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum, total


def packed_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A packed batch's per-example positions and mask (none for plain batches: the model derives them)."""
    return {key: batch[key].to(device, non_blocking=True) for key in ("position_ids", "attention_mask")
            if batch.get(key) is not None}


@torch.no_grad()
def evaluate(run: Run, examples: list[Example], autocast) -> float:
    """Mean loss over every target token of the held-out examples (sharded over processes)."""
    model = run.net.module if isinstance(run.net, nn.parallel.DistributedDataParallel) else run.net
    mine = examples[run.procs.rank::run.procs.world]
    mine = sorted(mine, key=len, reverse=True)  # similar lengths together: little padding
    device = run.procs.device
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    count = torch.zeros((), dtype=torch.float32, device=device)
    model.eval()
    size = run.config.per_device_eval_batch_size
    rounds = math.ceil(len(mine) / size)
    if run.sharded:  # every forward all-gathers weights: all processes run as many as rank 0 (the most examples)
        rounds = math.ceil(math.ceil(len(examples) / run.procs.world) / size)
    for start in range(0, rounds * size, size):
        chunk = mine[start:start + size]
        batch = collate(chunk or examples[:1], run.base.config.pad_token_id)  # a stand-in batch counts 0 tokens
        n = target_count(batch) if chunk else 0
        with autocast:
            out = model(batch["input_ids"].to(device), labels=batch["labels"].to(device), return_logits=False)
        loss_sum += out.loss.float() * n
        count += n
    model.train()
    return (run.procs.sum(loss_sum) / run.procs.sum(count).clamp(min=1.0)).item()


def epoch_of(sampler: LengthGroupedBatches | PackedBatches) -> float:
    return round(sampler.epoch + sampler.position / max(1, len(sampler)), 4)


# -- logging -------------------------------------------------------------------------------------------
def logged_step(line: str) -> float:
    """The step of one train_log.jsonl line; a blank or torn line (a run killed mid-write) counts as never logged."""
    try:
        record = json.loads(line)
        return float(record.get("step", 0)) if isinstance(record, dict) else float("inf")
    except (ValueError, TypeError):
        return float("inf")


class Reporter:
    """JSONL lines and TensorBoard scalars (rank 0 only)."""

    def __init__(self, config: TrainConfig, output_dir: Path, *, enabled: bool, resume_step: int):
        self.jsonl = output_dir / LOG_FILE if enabled and "jsonl" in config.report_to else None
        self.writer = None
        if self.jsonl is not None and self.jsonl.exists():
            # A resumed run rewrites what came after its checkpoint; a fresh run starts a new log.
            kept = [line for line in self.jsonl.read_text(encoding="utf-8", errors="replace").splitlines()
                    if logged_step(line) <= resume_step] if resume_step else []
            self.jsonl.write_text("".join(line + "\n" for line in kept))
        if enabled and "tensorboard" in config.report_to and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            with self.jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    group = "eval" if key.startswith("eval_") else "train"
                    self.writer.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# -- setup -----------------------------------------------------------------------------------------------
def read_records(config: TrainConfig, procs: Processes, records, examples) -> list | None:
    """Records from memory or the --data files; read before the model so bad data fails in seconds."""
    if examples is not None or records is not None:
        return records
    if not config.data:
        raise ChatGLMError("no training data: pass --data FILE (repeatable; JSON/JSONL files, directories or globs)")
    records, report = load_records(config.data, format=config.data_format, columns=config.columns,
                                   on_bad_row=config.on_bad_row, last_turn_only=config.last_turn_only)
    if procs.main:
        info(report.summary())
    return records


def prepare_data(config: TrainConfig, procs: Processes, tokenizer, records, examples) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples; the split is by conversation (records) or by example."""
    if examples is not None:
        return split_validation(list(examples), val_size=config.validation_size, seed=config.seed)
    if tokenizer is None:
        raise ChatGLMError("records need a tokenizer: pass tokenizer= (or a model path instead of a model object)")
    train_records, val_records = split_validation(list(records), val_size=config.validation_size, seed=config.seed)
    settings = dict(template=config.template, max_source_length=config.max_source_length,
                    max_target_length=config.max_target_length, cache_dir=default_cache_dir())
    if not procs.main:
        procs.barrier()  # rank 0 tokenizes and fills the cache first; the others then read it
    train_examples = tokenize_records(train_records, tokenizer, **settings)
    val_examples = tokenize_records(val_records, tokenizer, **settings) if val_records else []
    if procs.main:
        procs.barrier()
    return train_examples, val_examples


def fit_positions(examples: list[Example], positions: int, config: TrainConfig, split: str, *,
                  quiet: bool) -> list[Example]:
    """Examples longer than the model's positions (max_sequence_length) would index past its position table:
    dropped with a note (--on-bad-row skip) or refused (error)."""
    kept = [e for e in examples if len(e) <= positions]
    dropped = len(examples) - len(kept)
    if not dropped:
        return examples
    fix = "lower --max-source-length/--max-target-length"
    if config.on_bad_row == "error":
        raise DataError(f"{dropped} {split} example(s) are longer than the model's {positions} positions"
                        f" (max_sequence_length); {fix}, or drop them with --on-bad-row skip")
    if not kept and split == "training":
        raise DataError(f"every training example is longer than the model's {positions} positions; {fix}")
    if not quiet:
        info(f"warning: dropped {dropped} {split} example(s) longer than the model's {positions} positions"
             f" (max_sequence_length); {fix} to keep them")
    return kept


def prepare_model(config: TrainConfig, procs: Processes, model, tokenizer):
    """(model on this process's device (the CPU under FSDP) in the training dtype, tokenizer, autocast dtype,
    tokenizer dir)."""
    tokenizer_dir = None
    stored, amp = precision(config, procs.device, model)
    # FSDP: the whole model stays on the host; fully_shard moves only this process's shards to its GPU
    home = torch.device("cpu") if uses_fsdp(config, procs) else procs.device
    if model is None:
        from .api import load

        if not config.model:
            raise ChatGLMError("no model given; pass --model DIR (a ChatGLM-6B checkpoint directory)")
        model, loaded_tokenizer = load(config.model, dtype=stored, device=home, quantize=config.quantize)
        tokenizer = tokenizer or loaded_tokenizer
        tokenizer_dir = Path(config.model)
    else:
        if model.device != home:
            model.to(home)
        if config.finetuning_type == "full" and model.dtype != torch.float32:
            model.float()  # trained weights need float32 (autocast still computes in 16 bit on GPU)
    if tokenizer_dir is None and getattr(tokenizer, "model_file", None):
        tokenizer_dir = Path(tokenizer.model_file).parent
    return model, tokenizer, amp, tokenizer_dir


def make_sampler(config: TrainConfig, examples: list[Example], procs: Processes) -> LengthGroupedBatches | PackedBatches:
    """The batches of --batching: grouped by length (default), random, or packed rows."""
    lengths = [len(e) for e in examples]
    if config.batching == "packed":
        return PackedBatches(lengths, pack_length=config.packed_row_length, batch_size=config.per_device_train_batch_size,
                             seed=config.seed, num_replicas=procs.world, rank=procs.rank)
    return LengthGroupedBatches(lengths, batch_size=config.per_device_train_batch_size, seed=config.seed,
                                num_replicas=procs.world, rank=procs.rank, by_length=config.batching == "grouped")


def make_batch(run: Run, examples: list[Example], indices: list) -> tuple[dict[str, torch.Tensor], int]:
    """(collated micro-batch, its real tokens) for the sampler's `indices`: examples, or rows of examples when packed."""
    pad_id = run.base.config.pad_token_id
    if isinstance(run.sampler, PackedBatches):
        rows = [[examples[i] for i in row] for row in indices]
        batch = collate_packed(rows, pad_id, run.base.prompt_layout, device=run.procs.device,
                               width=run.sampler.pack_length)
        return batch, sum(len(e) for row in rows for e in row)
    chosen = [examples[i] for i in indices]
    return collate(chosen, pad_id), sum(len(e) for e in chosen)


def uses_fsdp(config: TrainConfig, procs: Processes) -> bool:
    return config.fsdp and procs.world > 1


def make_trainable(config: TrainConfig, model: nn.Module) -> nn.Module:
    if config.finetuning_type == "ptuning":
        # the same fresh prefix on every process and every run; the base is frozen whatever its dtype (int4 too)
        add_prefix_encoder(model, pre_seq_len=config.pre_seq_len, projection=config.prefix_projection, seed=config.seed)
        return model
    if config.finetuning_type == "lora":
        torch.manual_seed(config.seed)  # the same fresh adapter on every process and every run
        return apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          target=config.lora_target)
    integer = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if integer:
        raise ChatGLMError(f"full fine-tuning needs float weights, {integer[0]} is quantized; use LoRA (QLoRA)")
    return model.requires_grad_(True)


def make_optimizer(config: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights get no weight decay (the usual transformers rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = device.type == "cuda" and all(p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused or None)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then linear decay to 0 at the last step (transformers' default)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def describe(run: Run, n_train: int, n_val: int, amp, steps_per_epoch: int) -> str:
    c, procs = run.config, run.procs
    trainable = sum(p.numel() for p in run.trained.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in run.trained.parameters()}.values())
    what = (f"LoRA r={c.lora_r} alpha={c.lora_alpha} on {','.join(sorted(run.trained.peft_config['default'].target_modules))}"
            if run.lora else f"P-Tuning v2 pre_seq_len={c.pre_seq_len}" + (" with projection" if c.prefix_projection else "")
            if run.ptuning else "full fine-tuning")
    what += f", FSDP over {procs.world} processes" if run.sharded else ""
    global_batch = c.per_device_train_batch_size * procs.world * c.gradient_accumulation_steps
    real, positions = run.sampler.token_counts(run.sampler.epoch)
    if isinstance(run.sampler, PackedBatches):
        rows = len(run.sampler.rows)
        batching = (f"; packed into {rows:,} rows of <= {run.sampler.pack_length} tokens"
                    f" ({n_train / rows:.1f} examples per row)")
        unit = "rows"
    else:
        batching, unit = f"; {c.batching} batches", "examples"
    return (f"train: {n_train:,} examples" + (f" (+{n_val:,} validation)" if n_val else "")
            + batching + f" ({1 - real / positions:.1%} padding)"
            + f"; {run.total_steps:,} steps ({steps_per_epoch:,} per epoch) of {global_batch} {unit}"
            f" ({c.per_device_train_batch_size} x {procs.world} process(es) x {c.gradient_accumulation_steps} accumulation)"
            f"; {what}: {trainable:,} of {total:,} parameters train"
            f"; {str(amp).removeprefix('torch.') + ' autocast' if amp else 'float32'} on {procs.device}")


# -- the loop ------------------------------------------------------------------------------------------
def train(config: TrainConfig, *, model: nn.Module | None = None, tokenizer=None, records=None,
          examples: list[Example] | None = None) -> TrainResult:
    """Fine-tune and save the adapter (or full model) under `config.output_dir`.

    `model`/`tokenizer`/`records` (data.Record) may be given in memory; `examples` (data.Example)
    skips tokenization. A model given in memory is trained in place: after LoRA training it carries
    the adapter (active, unmerged) and can generate right away.
    """
    config.validate()
    procs = init_processes(config.device)
    try:
        return _train(config, procs, model, tokenizer, records, examples)
    finally:
        if procs.owns_group:
            dist.destroy_process_group()


def _train(config, procs, model, tokenizer, records, examples) -> TrainResult:
    output_dir = Path(config.output_dir).expanduser()
    aside = None
    if not config.resume:
        # refuse an earlier run (or the model's own folder) before loading anything; --overwrite moves it aside whole
        check_output_dir(output_dir, command="train", flag="--output-dir", overwrite=config.overwrite,
                         sources=[("--model", config.model)] if config.model else [], allow_foreign=True)
        if config.overwrite and procs.main and output_dir.exists() and any(output_dir.iterdir()):
            aside = move_aside(output_dir)
            info(f"note: --overwrite: the earlier run in {output_dir} moved to {aside.name}; removed once this run completes")
        procs.barrier()
    records = read_records(config, procs, records, examples)
    model, tokenizer, amp, tokenizer_dir = prepare_model(config, procs, model, tokenizer)
    train_examples, val_examples = prepare_data(config, procs, tokenizer, records, examples)
    positions = model.config.max_sequence_length
    train_examples = fit_positions(train_examples, positions, config, "training", quiet=not procs.main)
    val_examples = fit_positions(val_examples, positions, config, "validation", quiet=not procs.main)
    trained = make_trainable(config, model)
    base = trained.get_base_model() if config.finetuning_type == "lora" else model
    base.set_gradient_checkpointing(config.gradient_checkpointing)
    if config.compile and procs.device.type == "cuda":
        # each GLMBlock (with its LoRA layers) compiled: fused elementwise work and far fewer kernel launches,
        # which is what bounds small batches; dynamo reuses one graph for all 28 blocks
        for layer in base.transformer.layers:
            layer.compile()
    torch.manual_seed(config.seed + procs.rank)  # dropout: one stream per process
    random.seed(config.seed + procs.rank)
    net = trained
    if uses_fsdp(config, procs):
        from .fsdp import shard

        shard(trained, base.transformer.layers, device=procs.device, amp=amp)  # in place: net stays `trained`
    elif procs.world > 1:
        net = nn.parallel.DistributedDataParallel(
            trained, device_ids=[procs.device.index] if procs.device.type == "cuda" else None,
            broadcast_buffers=False)  # no buffer changes while training: skip the per-forward broadcast
    elif config.fsdp:
        info("note: --fsdp with one process: nothing to shard, training the whole model as usual")
    sampler = make_sampler(config, train_examples, procs)
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = max(1, len(sampler) // accumulation)
    total_steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.num_train_epochs * steps_per_epoch))
    optimizer = make_optimizer(config, trained, procs.device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None  # float16 gradients need loss scaling
    run = Run(config, procs, net, trained, base, optimizer, linear_schedule(optimizer, config.warmup_steps, total_steps),
              scaler, sampler, total_steps, tokenizer_dir, sharded=uses_fsdp(config, procs))

    found = checkpoints(output_dir)
    if config.resume and found:
        restore(run, found[-1][1])
        if procs.main:
            info(f"resuming from {found[-1][1]} (step {run.step} of {total_steps})")
    elif procs.main:
        if config.resume:
            info(f"note: --resume given but {output_dir} has no checkpoint; starting from step 0")
    if procs.main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        info(describe(run, len(train_examples), len(val_examples), amp, steps_per_epoch))
        if run.ptuning and config.learning_rate <= 1e-4:
            info(f"note: learning rate {config.learning_rate:g} is low for P-Tuning; THUDM's recipe uses 2e-2"
                 " (--learning-rate)")
        if run.lora and config.learning_rate <= 2e-5:
            info(f"note: learning rate {config.learning_rate:g} is the original chatglm6b_ft project's value for full fine-tuning;"
                 " LoRA usually needs 1e-4..1e-3 (--learning-rate)")
        if config.warmup_steps >= total_steps:
            info(f"note: warmup_steps {config.warmup_steps} >= {total_steps} steps: the learning rate never"
                 " reaches its peak (--warmup-steps)")
    procs.barrier()
    reporter = Reporter(config, output_dir, enabled=procs.main, resume_step=run.step)
    try:
        seconds, tokens_per_second = loop(run, train_examples, val_examples, amp, reporter)
    finally:
        reporter.close()

    weights, _ = gather_for_saving(run, optimizer=False)
    if procs.main:
        with writing(output_dir / ("adapter" if run.lora else "model")):
            save_weights(run, output_dir, weights)
    trained.eval()
    window = [loss for _, loss in run.losses[-config.logging_steps:]]
    result = TrainResult(
        output_dir=output_dir,
        adapter_dir=output_dir / "adapter" if run.lora else output_dir / PREFIX_DIR if run.ptuning else None,
        final_loss=sum(window) / len(window) if window else float("nan"), losses=run.losses,
        eval_losses=run.eval_losses, tokens_per_second=tokens_per_second, seconds=seconds, steps=run.step,
        model_dir=None if run.lora or run.ptuning else output_dir / "model",
        peak_memory_bytes=torch.cuda.max_memory_allocated(procs.device) if procs.device.type == "cuda" else None,
        padding_fraction=round(1 - run.token_counts[0] / run.token_counts[1], 4) if run.token_counts[1] else None,
    )
    if procs.main:
        (output_dir / RESULTS_FILE).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        where = result.adapter_dir or result.model_dir
        padding = f", {result.padding_fraction:.1%} of the batches padding" if result.padding_fraction is not None else ""
        info(f"done: {run.step} steps in {seconds:.1f}s, {tokens_per_second:,.0f} tokens/s (not counting padding{padding}), "
             f"final loss {result.final_loss:.4f}; saved {where}")
        discard(aside)
    procs.barrier()
    return result


def loop(run: Run, train_examples: list[Example], val_examples: list[Example], amp, reporter: Reporter) -> tuple[float, float]:
    """Run the remaining steps; returns (seconds, tokens per second after the first step)."""
    from tqdm.auto import tqdm

    config, procs = run.config, run.procs
    output_dir = Path(config.output_dir).expanduser()
    autocast = torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()
    run.net.train()

    def stream():
        while True:  # epoch after epoch; the sampler resumes mid-epoch after `restore`
            yield from run.sampler

    batches = stream()
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # losses not yet read back (no sync per step)
    last_saved = run.step

    def flush() -> None:
        if not pending:
            return
        sums = procs.sum(torch.stack([p[1] for p in pending]))
        values = (sums / torch.stack([p[2] for p in pending])).tolist()
        steps = [p[0] for p in pending]
        pending.clear()
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                raise ChatGLMError(
                    f"loss is {value} at step {step}: training stopped, nothing saved after step {last_saved}."
                    f" Lower --learning-rate ({config.learning_rate:g}), use --dtype bfloat16 or float32, or check the data"
                )
        run.losses.extend(zip(steps, values))

    bar = tqdm(total=run.total_steps, initial=run.step, disable=not (config.progress and procs.main),
               unit="step", dynamic_ncols=True, file=sys.stderr)
    start = time.perf_counter()
    timed_from, timed_tokens, tokens = None, 0, 0
    first_step = run.step
    window_tokens = [0, 0]  # this process's real tokens and batch positions since the last log line
    try:
        while run.step < run.total_steps:
            micro = [make_batch(run, train_examples, next(batches)) for _ in range(config.gradient_accumulation_steps)]
            lr = run.scheduler.get_last_lr()[0]
            loss_sum, count = train_step(run, [batch for batch, _ in micro], autocast)
            run.step += 1
            pending.append((run.step, loss_sum, count))
            real = sum(n for _, n in micro)
            tokens += real * procs.world  # about: other ranks' lengths are similar
            window_tokens[0] += real
            window_tokens[1] += sum(batch["input_ids"].numel() for batch, _ in micro)
            if run.step == first_step + 1:
                if procs.device.type == "cuda":
                    torch.cuda.synchronize(procs.device)
                timed_from, timed_tokens = time.perf_counter(), tokens
            bar.update(1)
            if run.step % config.logging_steps == 0 or run.step == run.total_steps:
                flush()
                window = [v for s, v in run.losses if s > run.step - config.logging_steps]
                elapsed = time.perf_counter() - start
                speed = throughput(tokens, timed_tokens, timed_from, elapsed)
                real, positions = procs.sum(torch.tensor(window_tokens, dtype=torch.long, device=procs.device)).tolist()
                run.token_counts = (run.token_counts[0] + real, run.token_counts[1] + positions)
                window_tokens = [0, 0]
                reporter.log({"step": run.step, "epoch": epoch_of(run.sampler), "loss": sum(window) / len(window),
                              "learning_rate": lr, "tokens_per_second": round(speed, 1),
                              "padding": round(1 - real / max(positions, 1), 4), "elapsed_s": round(elapsed, 2)})
                bar.set_postfix(loss=f"{window[-1]:.4f}", tok_s=f"{speed:,.0f}")
            if val_examples and config.eval_steps > 0 and (run.step % config.eval_steps == 0 or run.step == run.total_steps):
                flush()
                eval_loss = evaluate(run, val_examples, autocast)
                run.eval_losses.append((run.step, eval_loss))
                reporter.log({"step": run.step, "eval_loss": eval_loss})
                if procs.main:
                    bar.write(f"step {run.step}: eval loss {eval_loss:.4f}", file=sys.stderr)
            if config.save_steps > 0 and run.step % config.save_steps == 0 and run.step < run.total_steps:
                flush()  # never save after a NaN
                save_training_checkpoint(run, output_dir)
                last_saved = run.step
        flush()
    except KeyboardInterrupt:
        if procs.main:
            bar.write(f"interrupted at step {run.step}; "
                      + (f"continue from step {last_saved} with --resume" if last_saved else "no checkpoint saved yet"),
                      file=sys.stderr)
        raise
    finally:
        bar.close()
    if procs.device.type == "cuda":
        torch.cuda.synchronize(procs.device)
    seconds = time.perf_counter() - start
    return seconds, throughput(tokens, timed_tokens, timed_from, seconds)


def throughput(tokens: int, timed_tokens: int, timed_from: float | None, elapsed: float) -> float:
    """Tokens per second after the first step (which pays for allocation and kernel selection)."""
    if timed_from is None:
        return 0.0
    since = time.perf_counter() - timed_from
    if tokens > timed_tokens and since > 0:
        return (tokens - timed_tokens) / since
    return tokens / max(elapsed, 1e-9)
