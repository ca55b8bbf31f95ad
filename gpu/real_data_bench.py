"""LoRA training on real data (Alpaca zh, 50-600 tokens a row) against the synthetic figure, on one GPU.

Goal: useful (non-padding) tokens/s on real rows >= 85% of train_bench's config A measured in the same
run (batch 4 x 1024 synthetic tokens, no padding). Full-size ChatGLM-6B with random weights (bfloat16,
lm_head tied), LoRA r=8 on query_key_value, bfloat16 autocast, default data settings (chat template,
--max-source-length 512, --max-target-length 512), through `chatglm_ft.train.train`:

  synthetic     train_bench config A: batch 4 x 1024 tokens
  random        --batching random,  batch 8 x accumulation 4 (32 examples a step)
  grouped       --batching grouped, batch 8 x accumulation 4 (the default batching)
  grouped-again the same once more: the same seed gives the same batches, so every length has been run before;
                a cost paid once per new shape (plans, autotuning) shows as the difference to grouped
  packed        --batching packed,  4 rows of 1024 tokens a step (~63 examples; the memory of config A)
  packed-b2     --batching packed,  2 rows of 1024 tokens a step (~32 examples, as batch 32)
  grouped-b32   --batching grouped, batch 32 (the default batch size): its first batch is the epoch's
                longest (32 x 616 tokens), which may not fit an 80 GB card without checkpointing: an
                out-of-memory error is recorded, not fatal; it runs last

Batch 8 x 4 stands for the default batch 32 within an 80 GB card: train_bench's A peaks at 27.9 GB for
4,096 tokens (12.35 GB of weights, ~3.8 MB of activations a token), so 32 x 616 tokens would need ~87 GB.
tokens/s counts real tokens after the first step (which is each run's longest batch); `padding` is the
share of the trained batches' positions that were padding; `epoch_padding` the same over a whole epoch
of that batching (CPU, exact); `vs_synthetic` = tokens/s / synthetic tokens/s.

    python3 gpu/real_data_bench.py [--data ../shared/data/alpaca_zh] [--steps 30] [--only synthetic,random,...]
                                   [--attention no-cudnn]

`--attention no-cudnn` keeps SDPA off its cuDNN backend (flash, memory-efficient or math instead). cuDNN builds
an attention graph for each new shape (reported at a few hundred ms each), and random or grouped batches of
short examples bring a new length almost every step; packed rows always have the same one.

Writes $OUT/real_data_bench.json when $OUT is set; prints a table last. About 3 minutes on an H100.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "gpu"))

from chatglm_ft.bench import random_model  # noqa: E402
from chatglm_ft.config import ChatGLMConfig  # noqa: E402
from chatglm_ft.data import load_records, tokenize_records  # noqa: E402
from chatglm_ft.random_data import random_examples  # noqa: E402
from chatglm_ft.tokenizers import load_tokenizer  # noqa: E402
from chatglm_ft.train import TrainConfig, make_sampler, Processes  # noqa: E402
from train_bench import SEQ, run_config, save_and_report, timed_train  # noqa: E402  (the synthetic bench's timing)

GOAL = 0.85  # real-data useful tokens/s over the synthetic figure
GROUPED = dict(batching="grouped", per_device_train_batch_size=8, gradient_accumulation_steps=4)
PLANS = {  # name -> TrainConfig settings besides the defaults (run in this order)
    "random": dict(batching="random", per_device_train_batch_size=8, gradient_accumulation_steps=4),
    "grouped": GROUPED,
    "grouped-again": GROUPED,  # right after grouped, with its settings: every length seen before
    "packed": dict(batching="packed", per_device_train_batch_size=4),
    "packed-b2": dict(batching="packed", per_device_train_batch_size=2),
    "grouped-b32": dict(batching="grouped", per_device_train_batch_size=32),
}


def real_examples(data: Path, tokenizer_dir: Path) -> list:
    """Alpaca zh as `chatglm-ft train` reads it with the defaults (chat template, 512 + 512 tokens at most)."""
    if not data.exists():
        raise SystemExit(f"error: {data} not found; pass --data DIR (the alpaca_zh folder or one of its files)")
    records, report = load_records([str(data)])
    print(report.summary().splitlines()[0], file=sys.stderr)
    defaults = TrainConfig()
    return tokenize_records(records, load_tokenizer(tokenizer_dir), template=defaults.template,
                            max_source_length=defaults.max_source_length, max_target_length=defaults.max_target_length)


def epoch_padding(settings: dict, examples: list) -> float:
    """Padding share of a whole epoch of these batches (one process), counted on the CPU."""
    config = TrainConfig(**settings)
    real, positions = make_sampler(config, examples, Processes(0, 1, torch.device("cpu"))).token_counts(0)
    return round(1 - real / positions, 4)


def run_real(name: str, model, examples: list, *, steps: int, learning_rate: float) -> dict:
    settings = PLANS[name]
    result = timed_train(name, model, examples, steps=steps, learning_rate=learning_rate, **settings)
    losses = [v for _, v in result.losses]
    mean_length = sum(len(e) for e in examples) / len(examples)
    return {
        "config": name, **settings, "steps": result.steps,
        "tokens_per_second": round(result.tokens_per_second),
        "examples_per_second": round(result.tokens_per_second / mean_length, 1),
        "padding": result.padding_fraction, "epoch_padding": epoch_padding(settings, examples),
        "peak_gb": round(result.peak_memory_bytes / 1e9, 2),
        "losses_finite": all(v == v and abs(v) != float("inf") for v in losses),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/alpaca_zh", help="Alpaca zh folder or file")
    ap.add_argument("--tokenizer", default=str(REPO / "tests" / "fixtures" / "tokenizers" / "chatglm-6b"),
                    help="folder with ChatGLM-6B's ice_text.model (default: the copy in the test fixtures)")
    ap.add_argument("--only", default=",".join(["synthetic", *PLANS]))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--attention", choices=["default", "no-cudnn"], default="default",
                    help="SDPA backends: PyTorch's choice, or any but cuDNN")
    args = ap.parse_args()
    if args.attention == "no-cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(backends):
            return run(args)
    return run(args)


def run(args: argparse.Namespace) -> None:
    wanted = args.only.split(",")
    started = time.perf_counter()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "attention": args.attention,
                     "rows": [], "errors": {}}

    examples = real_examples(Path(args.data), Path(args.tokenizer))
    lengths = sorted(len(e) for e in examples)
    results["data"] = {"path": args.data, "examples": len(examples), "mean_tokens": round(sum(lengths) / len(lengths), 1),
                       "median_tokens": lengths[len(lengths) // 2], "max_tokens": lengths[-1],
                       "tokenize_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(results["data"]), file=sys.stderr)

    config = ChatGLMConfig.full()
    t0 = time.perf_counter()
    model = random_model(config, dtype=torch.bfloat16, device=torch.device("cuda"))  # N(0, 0.02), lm_head tied
    torch.cuda.synchronize()
    results["build_s"] = round(time.perf_counter() - t0, 1)

    synthetic = None
    if "synthetic" in wanted:
        try:
            row = run_config("A", model, config, batch=4, checkpointing=False, steps=max(8, args.steps // 2),
                             learning_rate=1e-3, data=random_examples(4, config=config, seq_len=SEQ))
            row["config"] = "synthetic"
            row["meets_train_bench_goal"] = row.pop("meets_goal")  # config A's own goal, not this bench's
            results["rows"].append(row)
            synthetic = row["tokens_per_second"]
        except Exception:
            results["errors"]["synthetic"] = traceback.format_exc()[-3000:]
    for name in PLANS:
        if name not in wanted:
            continue
        try:
            row = run_real(name, model, examples, steps=args.steps, learning_rate=1e-4)
            if synthetic:
                row["vs_synthetic"] = round(row["tokens_per_second"] / synthetic, 3)
                row["meets_goal"] = row["vs_synthetic"] >= GOAL
            results["rows"].append(row)
        except torch.cuda.OutOfMemoryError:
            results["rows"].append({"config": name, **PLANS[name], "out_of_memory": True,
                                    "epoch_padding": epoch_padding(PLANS[name], examples)})
        except Exception:
            results["errors"][name] = traceback.format_exc()[-3000:]
    results["seconds"] = round(time.perf_counter() - started, 1)

    save_and_report(results, "real_data_bench.json" if args.attention == "default" else f"real_data_bench_{args.attention}.json")
    print(f"{'config':12} {'batch':>9} {'tokens/s':>9} {'vs synth':>8} {'examples/s':>10} {'padding':>8} "
          f"{'epoch pad':>9} {'peak GB':>8} goal")
    for r in results["rows"]:
        batch = f"{r.get('per_device_train_batch_size', 4)}x{r.get('gradient_accumulation_steps', 1)}"
        if r.get("out_of_memory"):
            print(f"{r['config']:12} {batch:>9} {'out of memory':>9}{'':>30} {r['epoch_padding']:>9.1%}")
            continue
        padding = f"{r['padding']:.1%}" if r.get("padding") is not None else "0"
        epoch = f"{r['epoch_padding']:.1%}" if "epoch_padding" in r else "0"
        ratio = f"{r['vs_synthetic']:.2f}" if "vs_synthetic" in r else "-"
        print(f"{r['config']:12} {batch:>9} {r['tokens_per_second']:>9,} {ratio:>8} "
              f"{r.get('examples_per_second', '-'):>10} {padding:>8} {epoch:>9} {r['peak_gb']:>8} "
              f"{'yes' if r.get('meets_goal') else '-' if 'meets_goal' not in r else 'NO'}")


if __name__ == "__main__":
    main()
