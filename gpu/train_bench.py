"""LoRA / QLoRA training on one GPU (issue 4): full-size ChatGLM-6B with random weights, sequences of
1024 tokens, LoRA r=8 on query_key_value, bfloat16 autocast, measured through `chatglm_ft.train.train`
(the loop users run, including its optimizer, clipping and logging):

  A  LoRA, batch 4, no checkpointing         goal >= 16,000 tokens/s at <= 40 GB peak
  B  LoRA, batch 1, gradient checkpointing   goal >=  9,000 tokens/s at <= 14 GB peak
  B-compile  B with --compile (torch.compile of each layer): batch 1 is host-bound, this is the fast setting
  C  QLoRA int4 base, batch 1, checkpointing goal peak <= 6 GB
  (original implementation + PEFT on the same H200: A 10,632 tokens/s at 81.7 GB, B 5,996 at 15.4 GB)

Sanity: the chunked loss equals F.cross_entropy over full logits; the loss falls while A trains on
one repeated batch. tokens/s counts every token of every sequence (no padding here) after the first
step; peak is torch.cuda.max_memory_allocated during the run (weights included: 12.35 GB for the
tied bfloat16 model).

    python3 gpu/train_bench.py [--only A,B,B-compile,C] [--steps 12] [--profile B]

Writes $OUT/train_bench.json when $OUT is set; prints a table last.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatglm_ft.bench import random_model  # noqa: E402
from chatglm_ft.config import ChatGLMConfig  # noqa: E402
from chatglm_ft.data import Example  # noqa: E402
from chatglm_ft.lora import remove_adapters  # noqa: E402
from chatglm_ft.random_data import random_examples  # noqa: E402
from chatglm_ft.train import TrainConfig, train  # noqa: E402

SEQ = 1024
GOALS = {"A": {"tokens_per_second": 16000, "peak_gb": 40}, "B": {"tokens_per_second": 9000, "peak_gb": 14},
         "B-compile": {"tokens_per_second": 9000, "peak_gb": 14},
         "C": {"peak_gb": 6}}
BASELINE = {"A": {"tokens_per_second": 10632, "peak_gb": 81.7}, "B": {"tokens_per_second": 5996, "peak_gb": 15.4}}


def loss_check(model, config: ChatGLMConfig) -> dict:
    """Chunked fused loss (what training uses) vs cross-entropy over materialised full logits, bf16 autocast."""
    ex = random_examples(1, config=config, seq_len=SEQ)[0]
    ids, labels = torch.tensor([ex.input_ids], device="cuda"), torch.tensor([ex.labels], device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours = model(ids, labels=labels, return_logits=False).loss.item()
        logits = model(ids).logits
        reference = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100).item()
    return {"chunked_loss": ours, "full_logits_loss": reference, "abs_diff": abs(ours - reference),
            "ok": abs(ours - reference) < 2e-3}


def timed_train(name: str, model, data: list[Example], *, steps: int, profile: bool = False, **settings):
    """`train` on the model in memory for `steps` steps with TrainConfig `settings`; the adapter is removed
    afterwards and compiled layers go back to eager, so the next configuration starts from the plain base.
    The TrainResult's tokens/s (non-padding, after the first step) and peak memory are the measurement."""
    layers = model.transformer.layers
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(output_dir=out, max_steps=steps, warmup_steps=0, logging_steps=steps, save_steps=0,
                              eval_steps=0, progress=False, report_to=["none"], **settings)
            return _train_maybe_profiled(name, cfg, model, data, steps, profile)
    finally:
        remove_adapters(model)  # the next configuration starts from the plain base again
        if settings.get("compile"):
            for layer in layers:
                layer._compiled_call_impl = None  # back to eager


def _train_maybe_profiled(name: str, cfg: TrainConfig, model, data: list[Example], steps: int, profile: bool):
    if not profile:
        return train(cfg, model=model, examples=data)
    from torch.profiler import ProfilerActivity, profile as torch_profile

    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = train(cfg, model=model, examples=data)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    print(f"--- profile {name}: wall {wall:.2f} s, GPU kernels {gpu_us / 1e6:.2f} s "
          f"({100 * gpu_us / 1e6 / wall:.0f}% busy), {steps} steps", file=sys.stderr)
    print(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70), file=sys.stderr)
    return result


def run_config(name: str, model, config: ChatGLMConfig, *, batch: int, checkpointing: bool, steps: int,
               learning_rate: float, data: list[Example], profile: bool = False,
               compile_layers: bool = False) -> dict:
    result = timed_train(name, model, data, steps=steps, profile=profile, per_device_train_batch_size=batch,
                         gradient_checkpointing=checkpointing, learning_rate=learning_rate,
                         max_source_length=SEQ, max_target_length=SEQ, compile=compile_layers)
    losses = [v for _, v in result.losses]
    row = {
        "config": name, "batch": batch, "seq": SEQ, "gradient_checkpointing": checkpointing, "steps": result.steps,
        "tokens_per_second": round(result.tokens_per_second), "step_ms": round(1000 * batch * SEQ / result.tokens_per_second, 1),
        "peak_gb": round(result.peak_memory_bytes / 1e9, 2), "first_loss": losses[0], "last_loss": losses[-1],
        "compiled_layers": compile_layers,
        "losses_finite": all(v == v and abs(v) != float("inf") for v in losses),
    }
    goal = GOALS.get(name, {})
    row["meets_goal"] = (row["tokens_per_second"] >= goal.get("tokens_per_second", 0)
                         and row["peak_gb"] <= goal.get("peak_gb", float("inf")))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="A,B,C")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--profile", default="", help="configs to profile (e.g. B): print GPU busy time and the top kernels")
    args = ap.parse_args()
    wanted = args.only.split(",")
    started = time.perf_counter()
    config = ChatGLMConfig.full()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "errors": {}}

    t0 = time.perf_counter()
    model = random_model(config, dtype=torch.bfloat16, device=torch.device("cuda"))  # N(0, 0.02), lm_head tied
    torch.cuda.synchronize()
    results["build_s"] = round(time.perf_counter() - t0, 1)
    results["weights_gb"] = round(sum(p.numel() * p.element_size()
                                      for p in {id(p): p for p in model.parameters()}.values()) / 1e9, 2)
    try:
        results["loss_check"] = loss_check(model, config)
    except Exception:
        results["errors"]["loss_check"] = traceback.format_exc()[-2000:]

    one_batch, eight = random_examples(4, config=config, seq_len=SEQ), random_examples(8, config=config, seq_len=SEQ)
    plans = [
        # A trains on one repeated batch (4 sequences): its loss must fall (sanity) while throughput is measured.
        ("A", dict(batch=4, checkpointing=False, steps=args.steps, learning_rate=1e-3, data=one_batch,
                   profile="A" in args.profile.split(","))),
        ("B", dict(batch=1, checkpointing=True, steps=args.steps + 8, learning_rate=1e-4, data=eight,
                   profile="B" in args.profile.split(","))),
        # B with --compile: compiled layers (fused elementwise work, far fewer launches)
        ("B-compile", dict(batch=1, checkpointing=True, steps=args.steps + 8, learning_rate=1e-4, data=eight,
                           compile_layers=True, profile="B-compile" in args.profile.split(","))),
    ]
    for name, plan in plans:
        if name not in wanted:
            continue
        try:
            results["rows"].append(run_config(name, model, config, **plan))
        except Exception:
            results["errors"][name] = traceback.format_exc()[-3000:]
            remove_adapters(model)

    if "C" in wanted:
        try:
            from chatglm_ft.quantize import quantize_model

            quantize_model(model, "int4")  # in place: the float layer weights are dropped
            gc.collect()
            torch.cuda.empty_cache()
            results["int4_weights_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)
            results["rows"].append(run_config("C", model, config, batch=1, checkpointing=True, steps=args.steps,
                                              learning_rate=1e-4, data=eight))
        except Exception:
            results["errors"]["C"] = traceback.format_exc()[-3000:]
    results["seconds"] = round(time.perf_counter() - started, 1)

    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "train_bench.json").write_text(json.dumps(results, indent=2))
    for name, error in results["errors"].items():
        print(f"--- {name} failed:\n{error}", file=sys.stderr)
    print(json.dumps({k: v for k, v in results.items() if k not in ("rows", "errors")}, indent=1))
    print(f"{'cfg':3} {'batch':>5} {'ckpt':>5} {'tokens/s':>9} {'goal':>7} {'orig':>7} {'step ms':>8} {'peak GB':>8} "
          f"{'goal':>5} {'orig':>5} {'loss first->last':>18} ok")
    for r in results["rows"]:
        g, b = GOALS.get(r["config"], {}), BASELINE.get(r["config"], {})
        print(f"{r['config']:3} {r['batch']:>5} {str(r['gradient_checkpointing']):>5} {r['tokens_per_second']:>9,} "
              f"{g.get('tokens_per_second', '-'):>7} {b.get('tokens_per_second', '-'):>7} {r['step_ms']:>8} "
              f"{r['peak_gb']:>8} {g.get('peak_gb', '-'):>5} {b.get('peak_gb', '-'):>5} "
              f"{r['first_loss']:>8.4f}->{r['last_loss']:<8.4f} {'yes' if r['meets_goal'] else 'NO'}")


if __name__ == "__main__":
    main()
