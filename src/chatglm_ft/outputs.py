"""Output directories: a command writes only what it owns and never destroys a user's files.

`--out DIR` (merge, quantize, demo) and `--output-dir` (train) follow one policy:
- never the working directory or a folder above it, nor a source the command reads (the model, an
  adapter) or a folder holding one;
- a missing or empty directory is fine;
- a non-empty one only when it holds an earlier output of the same command (recognised by its files)
  and `--overwrite` is given; the earlier output is then moved aside with one rename and removed only
  once the new one is complete, so a killed run never leaves two runs mixed.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import ChatGLMError

TOKENIZER_NAMES = {"ice_text.model", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"}
CHECKPOINT_NAMES = {"config.json", "model.safetensors.index.json", "model.safetensors"} | TOKENIZER_NAMES
TRAIN_NAMES = {"adapter", "model", "train_log.jsonl", "train_results.json", "train_config.json", "tensorboard"}
DEMO_NAMES = {"base", "base-training", "data", "demo_results.json"} | TRAIN_NAMES


class OutputError(ChatGLMError):
    """An output directory would destroy files the command does not own."""


class DiskFullError(ChatGLMError):
    """The disk filled up while writing an output."""


def _is_shard(name: str) -> bool:
    return name.startswith("model-") and name.endswith(".safetensors")


def _checkpoint_config(path: Path) -> dict | None:
    """config.json of a directory holding only what `save_checkpoint` writes, else None."""
    names = {p.name for p in path.iterdir()}
    if "config.json" not in names or not all(n in CHECKPOINT_NAMES or _is_shard(n) for n in names):
        return None
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _is_train_run(path: Path) -> bool:
    return (path / "train_config.json").is_file() or any(
        p.name.startswith("checkpoint-") and (p / "trainer_state.json").exists() for p in path.iterdir())


def is_output_of(path: Path, command: str) -> bool:
    """Whether `path` (an existing directory) holds an earlier output of `command`, judged by its files."""
    if command in ("merge", "quantize"):
        config = _checkpoint_config(path)
        return config is not None and bool(config.get("quantization")) == (command == "quantize")
    if command == "train":
        return _is_train_run(path) and all(_owned_by_train(p.name) for p in path.iterdir())
    if command == "demo":
        marker = (path / "demo_results.json").is_file() or ((path / "base").is_dir() and (path / "data").is_dir())
        return marker and all(p.name in DEMO_NAMES or _owned_by_train(p.name) or p.name.startswith("base.tmp")
                              for p in path.iterdir())
    raise ValueError(command)


def _owned_by_train(name: str) -> bool:
    return name in TRAIN_NAMES or name.startswith("checkpoint-") or name.startswith(("adapter.tmp", "model.tmp"))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(out: str | Path, *, command: str, flag: str = "--out", overwrite: bool = False,
                     sources: Iterable[tuple[str, str | Path]] = (), allow_foreign: bool = False) -> Path:
    """The resolved output directory, or OutputError when writing there could destroy the user's files.

    `sources`: (flag, path) pairs the command reads; `out` may be none of them nor hold one.
    `allow_foreign`: the command writes only its own names beside unrelated files (train), so only
    an earlier run of its own is refused."""
    target = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, target):
        raise OutputError(f"{flag} {out} is the working directory or holds it; name a new directory, e.g. {flag} ./{command}-out")
    for source_flag, source in sources:
        source_path = Path(source).expanduser().resolve()
        if _within(source_path, target):
            if allow_foreign and source_path != target and not _owned_by_train(source_path.relative_to(target).parts[0]):
                continue  # beside the output's own names (the demo trains next to its base/): never written
            what = "is" if source_path == target else "holds"
            raise OutputError(f"{flag} {out} {what} the {source_flag} directory {source}; choose a new directory")
    if not target.exists():
        return target
    if not target.is_dir():
        raise OutputError(f"{flag} {out} is a file, not a directory; choose a new directory")
    if not any(target.iterdir()):
        return target
    if command == "train":
        earlier = _is_train_run(target) or any(_owned_by_train(p.name) for p in target.iterdir())
        if not earlier and allow_foreign:
            return target
    else:
        earlier = is_output_of(target, command)
    if not earlier:
        raise OutputError(f"{flag} {out} exists and holds files that are not a chatglm-ft {command} output;"
                          " choose a new or empty directory")
    if not overwrite:
        extra = " or --resume to continue it" if command == "train" else ""
        raise OutputError(f"{flag} {out} holds an earlier {command} output; pass --overwrite to replace it{extra},"
                          " or choose a new directory")
    if command == "train" and not is_output_of(target, command):
        raise OutputError(f"{flag} {out} holds an earlier run beside other files; --overwrite would mix them:"
                          " move the other files away or choose a new directory")
    return target


def move_aside(path: Path) -> Path | None:
    """Rename an existing `path` to a hidden sibling in one step (None when there is nothing); the caller
    removes it with `discard` once the new output is complete, so a killed run leaves the old one whole."""
    if not path.exists():
        return None
    aside = path.with_name(f".{path.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    return aside


def discard(aside: Path | None) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT as an OSError, or as the text safetensors (Rust) and torch.save put in their own errors."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left" in text or "os error 28" in text or "Disk quota exceeded" in text or (
        "file write failed" in text)  # torch.save's PytorchStreamWriter


@contextmanager
def writing(out: Path, partial: Path | None = None) -> Iterator[None]:
    """Around writing `out` (into `partial` first, when given): a failure removes the partial copy, and a full
    disk becomes one line naming it."""
    try:
        yield
    except BaseException as e:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFullError(f"the disk is full: could not write {out}; free some space and run the command again"
                                + (" (nothing was replaced)" if partial is not None else "")) from None
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_like_other_files(path: Path) -> None:
    """Give every file under `path` the mode an ordinary new file gets (0644 under the usual umask).
    safetensors writes its files 0600, which locks a service account out of a merged or trained checkpoint."""
    mode = 0o666 & ~current_umask()
    for file in [path] if path.is_file() else path.rglob("*"):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)
