"""Eval generation speed on the GPU: batched vs one-at-a-time, full-size random-weight ChatGLM-6B (fp16).

200 prompts of 50-120 tokens, 128 new tokens each, greedy, the stop token disabled so every row runs
its full budget. Batched: `evaluate.generate_answers` (the code path of `chatglm-ft eval`: sorted
by length, batches of --batch-size). One-at-a-time: the first --single prompts, one `generate` call
each, extrapolated to all prompts. Goal: batched >= 8x the prompts/s of one-at-a-time.

Each mode (the default decode path, then eager, DecodeOptions(compile="off")) runs once cold
(compilation and CUDA-graph capture included) and is timed warm. Prompts stay under 120 tokens so
prompt + answer fit the fast path's first KV bucket (256): one compile per batch size (64, the
remainder 8, and 1). The eager pass is skipped when the default one leaves too little of 4 minutes.

    python3 gpu/eval_bench.py [--batch-size 64] [--modes default,eager]

Writes $OUT/eval_bench.json when $OUT is set; prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatglm_ft.bench import random_model  # noqa: E402
from chatglm_ft.config import ChatGLMConfig  # noqa: E402
from chatglm_ft.evaluate import generate_answers  # noqa: E402
from chatglm_ft.generate import GenerationConfig, generate  # noqa: E402
from chatglm_ft.options import DecodeOptions  # noqa: E402

TIME_LIMIT_S = 150  # start no further mode after this, to stay inside 4 minutes


def synthetic_prompts(config: ChatGLMConfig, count: int, seed: int = 0) -> list[list[int]]:
    """Random text ids (50-120 of them) + [gMASK] <sop>, like encoded questions."""
    rng = random.Random(seed)
    return [[rng.randrange(20, 130000) for _ in range(rng.randint(50, 120))] + [config.gmask_token_id, config.bos_token_id]
            for _ in range(count)]


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_mode(model, prompts, gen, *, batch_size: int, single: int) -> dict:
    batched = lambda: generate_answers(model, None, prompts, gen=gen, batch_size=batch_size)  # noqa: E731
    cold = timed(batched)  # compiles and captures every batch shape it meets
    warm = timed(batched)
    generate(model, None, prompts[:1], gen)  # batch-1 warm-up
    one_by_one = timed(lambda: [generate(model, None, [p], gen) for p in prompts[:single]])
    batched_pps = len(prompts) / warm
    single_pps = single / one_by_one
    return {
        "batched_cold_s": round(cold, 2), "batched_warm_s": round(warm, 2),
        "batched_prompts_per_s": round(batched_pps, 2),
        "batched_tokens_per_s": round(len(prompts) * gen.max_new_tokens / warm, 1),
        "single_s_for_subset": round(one_by_one, 2), "single_subset": single,
        "single_prompts_per_s": round(single_pps, 3),
        "single_tokens_per_s": round(single * gen.max_new_tokens / one_by_one, 1),
        "single_extrapolated_s_for_all": round(len(prompts) / single_pps, 1),
        "speedup": round(batched_pps / single_pps, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--single", type=int, default=8, help="prompts measured one at a time (then extrapolated)")
    ap.add_argument("--modes", default="default,eager", help="default (the path eval uses on CUDA), eager")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("eval_bench.py needs a CUDA GPU")
    began = time.perf_counter()
    config = ChatGLMConfig.full()
    model = random_model(config, dtype=torch.float16, device=torch.device("cuda"))
    prompts = synthetic_prompts(config, args.prompts)
    # stop_token_ids=(): <eop> never ends a row, so every prompt gets exactly new_tokens tokens
    gen = GenerationConfig(max_new_tokens=args.new_tokens, stop_token_ids=())
    results: dict[str, dict] = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if time.perf_counter() - began > TIME_LIMIT_S:
            results[mode] = {"skipped": "time limit"}
            continue
        model.decode_options = DecodeOptions(compile="off" if mode == "eager" else "auto")
        results[mode] = run_mode(model, prompts, gen, batch_size=args.batch_size, single=args.single)
        print(mode, json.dumps(results[mode]), flush=True)
    report = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "model": "ChatGLM-6B full size, random weights, float16", "prompts": args.prompts,
        "prompt_tokens": "50-120 + [gMASK] <sop>", "new_tokens": args.new_tokens, "batch_size": args.batch_size,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "wall_s": round(time.perf_counter() - began, 1), "modes": results,
    }
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "eval_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"\n{'mode':8} {'batched prompts/s':>18} {'one-at-a-time prompts/s':>24} {'speedup':>8} {'goal >= 8x':>10}")
    for mode, r in results.items():
        if "speedup" in r:
            print(f"{mode:8} {r['batched_prompts_per_s']:>18.2f} {r['single_prompts_per_s']:>24.3f} "
                  f"{r['speedup']:>7.1f}x {'met' if r['speedup'] >= 8 else 'MISSED':>10}")
        else:
            print(f"{mode:8} skipped ({r['skipped']})")


if __name__ == "__main__":
    main()
