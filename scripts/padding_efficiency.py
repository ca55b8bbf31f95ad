"""Share of real (non-padding) tokens in the training batches of one epoch, for each `--batching`, counted
exactly on the CPU with the batches `chatglm-ft train` would build (no model needed, only the tokenizer).

    python3 scripts/padding_efficiency.py --data ../shared/data/alpaca_zh \
        --tokenizer ../shared/models/chatglm-6b --tokenizer ../shared/models/chatglm3-6b [--batch 32 --batch 8] [--epochs 3]

Prints a Markdown table (docs/benchmarks.md, LoRA training). Rows: random and grouped batches of --batch
examples (repeatable; default 32); packed rows of --max-source-length + --max-target-length tokens (default 1024), --packed-batch rows
a batch. Each figure is the mean over --epochs epochs (batches differ per epoch; packed rows do not).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatglm_ft.data import load_records, tokenize_records  # noqa: E402
from chatglm_ft.tokenizers import detect_family, load_tokenizer  # noqa: E402
from chatglm_ft.train import Processes, TrainConfig, make_sampler  # noqa: E402

NAMES = {"chatglm": "ChatGLM-6B", "chatglm2": "ChatGLM2-6B", "chatglm3": "ChatGLM3-6B"}


def efficiency(config: TrainConfig, examples: list, epochs: int) -> tuple[float, int]:
    """(real tokens / batch positions over `epochs` epochs, batches per epoch) of one process."""
    sampler = make_sampler(config, examples, Processes(0, 1, torch.device("cpu")))
    counts = [sampler.token_counts(epoch) for epoch in range(epochs)]
    return sum(r for r, _ in counts) / sum(p for _, p in counts), len(sampler)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--tokenizer", action="append", required=True, help="checkpoint folder with the tokenizer (repeatable)")
    ap.add_argument("--template", default="chatglm")
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--packed-batch", type=int, default=4)
    ap.add_argument("--max-source-length", type=int, default=512)
    ap.add_argument("--max-target-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    records, report = load_records(args.data)
    print(report.summary().splitlines()[0], file=sys.stderr)
    base = dict(template=args.template, max_source_length=args.max_source_length,
                max_target_length=args.max_target_length, seed=args.seed)
    print("| tokenizer | examples | tokens (mean / max) | batching | batch | batches per epoch | real tokens |")
    print("|---|---|---|---|---|---|---|")
    for folder in args.tokenizer:
        tokenizer = load_tokenizer(folder)
        examples = tokenize_records(records, tokenizer, template=args.template, max_source_length=args.max_source_length,
                                    max_target_length=args.max_target_length)
        lengths = [len(e) for e in examples]
        name = NAMES[detect_family(folder)]
        plans = [(batching, batch) for batch in args.batch or [32] for batching in ("random", "grouped")]
        plans.append(("packed", args.packed_batch))
        for batching, batch in plans:
            config = TrainConfig(batching=batching, per_device_train_batch_size=batch, **base)
            share, batches = efficiency(config, examples, args.epochs)
            size = (f"{batch} rows of {config.packed_row_length} tokens" if batching == "packed" else f"{batch} examples")
            print(f"| {name} | {len(examples):,} | {sum(lengths) / len(lengths):.1f} / {max(lengths)} | {batching} | {size}"
                  f" | {batches:,} | {share:.1%} |")


if __name__ == "__main__":
    main()
