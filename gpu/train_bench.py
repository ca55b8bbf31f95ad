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

    python3 gpu/train_bench.py [--config full] [--only A,B,B-compile,C] [--steps 12] [--profile B]
    python3 gpu/train_bench.py --config chatglm3 --only A --steps 8   # ChatGLM3-6B (untied output layer, 2 KV heads)
    python3 gpu/train_bench.py --smoke --config chatglm3              # the same code on the tiny shape, CPU (seconds)

--config takes `chatglm-ft bench --config`'s names (full = ChatGLM-6B, the default; chatglm2, chatglm3; the tiny
ones); the goals above are ChatGLM-6B's and are judged for `full` only. Each row records the model FLOP rate:
(4 + 2 with checkpointing) x matmul parameters per token (forward 2N, backward through the frozen weights 2N,
recomputation 2N; attention scores not counted), and its fraction of the card's dense bfloat16 peak.

Writes $OUT/train_bench.json (full) or $OUT/train_bench_<config>.json when $OUT is set; prints a table last.
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
from chatglm_ft.commands.bench import BENCH_CONFIGS, bench_config  # noqa: E402
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
PEAK_BF16_TFLOPS = 989  # H100 SXM / H200 dense bfloat16


def matmul_parameters(model) -> int:
    """Parameters that take part in matrix products, each once (a tied lm_head counts once; an untied input
    embedding is a lookup, not a product)."""
    head = {id(p) for p in model.lm_head.parameters()}  # tied: the embedding's own Parameter
    lookup = {id(p) for p in model.transformer.word_embeddings.parameters()} - head
    return sum(p.numel() for p in model.parameters() if id(p) not in lookup)  # parameters() yields each once


def bench_model_config(name: str, smoke: bool):
    """The config `--config name` names; --smoke: the tiny shape of the same generation."""
    if smoke and not name.endswith("tiny"):
        name = "tiny" if name in ("full", "mid") else f"{name}-tiny"
    return bench_config(name)


def rows(n: int, config, seq: int) -> list[Example]:
    """n random rows of exactly `seq` tokens in the generation's training layout (62 prompt tokens at 1024)."""
    return random_examples(n, config=config, seq_len=seq, prompt_tokens=min(62, seq // 4))


def build(config, device: torch.device):
    """Random weights N(0, 0.02) (ChatGLM-6B's lm_head tied, ChatGLM2/3's output layer its own), bfloat16 on
    the GPU, float32 on the CPU."""
    return random_model(config, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)


def loss_check(model, config: ChatGLMConfig, seq: int = SEQ) -> dict:
    """Chunked fused loss (what training uses) vs cross-entropy over materialised full logits, bf16 autocast."""
    ex = rows(1, config, seq)[0]
    device = model.device
    ids, labels = torch.tensor([ex.input_ids], device=device), torch.tensor([ex.labels], device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
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
    if torch.cuda.is_available():
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
               compile_layers: bool = False, seq: int = SEQ, goals: bool = True,
               matmul_params: int | None = None) -> dict:
    """One configuration's row; `goals`: judge it against ChatGLM-6B's GOALS (meets_goal None otherwise);
    `matmul_params`: record the model FLOP rate it reaches."""
    result = timed_train(name, model, data, steps=steps, profile=profile, per_device_train_batch_size=batch,
                         gradient_checkpointing=checkpointing, learning_rate=learning_rate,
                         max_source_length=seq, max_target_length=seq, compile=compile_layers)
    losses = [v for _, v in result.losses]
    peak = result.peak_memory_bytes
    row = {
        "config": name, "batch": batch, "seq": seq, "gradient_checkpointing": checkpointing, "steps": result.steps,
        "tokens_per_second": round(result.tokens_per_second), "step_ms": round(1000 * batch * seq / result.tokens_per_second, 1),
        "peak_gb": round(peak / 1e9, 2) if peak is not None else None, "first_loss": losses[0], "last_loss": losses[-1],
        "compiled_layers": compile_layers,
        "losses_finite": all(v == v and abs(v) != float("inf") for v in losses),
    }
    if matmul_params:
        tflops = (4 + 2 * checkpointing) * matmul_params * result.tokens_per_second / 1e12
        row["model_tflops"] = round(tflops, 1)
        row["fraction_of_bf16_peak"] = round(tflops / PEAK_BF16_TFLOPS, 3)
    goal = GOALS.get(name, {})
    row["meets_goal"] = (row["tokens_per_second"] >= goal.get("tokens_per_second", 0)
                         and (row["peak_gb"] or 0) <= goal.get("peak_gb", float("inf"))) if goals else None
    return row


def save_and_report(results: dict, json_name: str) -> None:
    """The training benches' common ending: the results to $OUT/json_name (when $OUT is set), each failed
    configuration's traceback to stderr, then the settings (all but the rows and errors) as JSON."""
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], json_name).write_text(json.dumps(results, indent=2))
    for name, error in results["errors"].items():
        print(f"--- {name} failed:\n{error}", file=sys.stderr)
    print(json.dumps({k: v for k, v in results.items() if k not in ("rows", "errors")}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=list(BENCH_CONFIGS), default="full",
                    help="model shape: full = ChatGLM-6B, chatglm2 / chatglm3 = ChatGLM2-6B / ChatGLM3-6B, "
                         "or a tiny one")
    ap.add_argument("--only", default=None, help="configurations to run (default A,B,C; with --smoke A,B)")
    ap.add_argument("--steps", type=int, default=None, help="steps of A and C (B: 8 more; default 12, --smoke 2)")
    ap.add_argument("--profile", default="", help="configs to profile (e.g. B): print GPU busy time and the top kernels")
    ap.add_argument("--smoke", action="store_true",
                    help="the tiny shape of --config's generation on the CPU, 64-token rows: the code paths in seconds")
    args = ap.parse_args()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("train_bench needs a CUDA GPU (or --smoke for a CPU run of the same code)")
    wanted = (args.only or ("A,B" if smoke else "A,B,C")).split(",")
    steps = args.steps or (2 if smoke else 12)
    seq = 64 if smoke else SEQ
    device = torch.device("cpu" if smoke else "cuda")
    started = time.perf_counter()
    config = bench_model_config(args.config, smoke)
    results: dict = {"config": args.config, "family": getattr(config, "family", "chatglm"),
                     "device": "cpu (smoke)" if smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
                     "seq": seq, "rows": [], "errors": {}}

    t0 = time.perf_counter()
    model = build(config, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    results["build_s"] = round(time.perf_counter() - t0, 1)
    results["weights_gb"] = round(sum(p.numel() * p.element_size()
                                      for p in {id(p): p for p in model.parameters()}.values()) / 1e9, 2)
    results["parameters"] = sum(p.numel() for p in model.parameters())
    results["matmul_parameters"] = matmul = matmul_parameters(model)
    goals = args.config == "full"
    try:
        results["loss_check"] = loss_check(model, config, seq)
    except Exception:
        results["errors"]["loss_check"] = traceback.format_exc()[-2000:]

    one_batch, eight = rows(4, config, seq), rows(8, config, seq)
    plans = [
        # A trains on one repeated batch (4 sequences): its loss must fall (sanity) while throughput is measured.
        ("A", dict(batch=4, checkpointing=False, steps=steps, learning_rate=1e-3, data=one_batch,
                   profile="A" in args.profile.split(","))),
        ("B", dict(batch=1, checkpointing=True, steps=steps + 8, learning_rate=1e-4, data=eight,
                   profile="B" in args.profile.split(","))),
        # B with --compile: compiled layers (fused elementwise work, far fewer launches)
        ("B-compile", dict(batch=1, checkpointing=True, steps=steps + 8, learning_rate=1e-4, data=eight,
                           compile_layers=True, profile="B-compile" in args.profile.split(","))),
    ]
    for name, plan in plans:
        if name not in wanted:
            continue
        try:
            results["rows"].append(run_config(name, model, config, seq=seq, goals=goals,
                                              matmul_params=None if smoke else matmul, **plan))
        except Exception:
            results["errors"][name] = traceback.format_exc()[-3000:]
            remove_adapters(model)

    if "C" in wanted:
        try:
            from chatglm_ft.quantize import quantize_model

            quantize_model(model, "int4")  # in place: the float layer weights are dropped
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                results["int4_weights_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)
            results["rows"].append(run_config("C", model, config, batch=1, checkpointing=True, steps=steps,
                                              learning_rate=1e-4, data=eight, seq=seq, goals=goals,
                                              matmul_params=None if smoke else matmul))
        except Exception:
            results["errors"]["C"] = traceback.format_exc()[-3000:]
    results["seconds"] = round(time.perf_counter() - started, 1)

    save_and_report(results, "train_bench.json" if args.config == "full" else f"train_bench_{args.config}.json")
    print(f"{args.config}: goal/orig columns are ChatGLM-6B's" if goals else
          f"{args.config}: no goals (ChatGLM-6B's goal/orig columns left out)")
    print(f"{'cfg':3} {'batch':>5} {'ckpt':>5} {'tokens/s':>9} {'goal':>7} {'orig':>7} {'step ms':>8} {'peak GB':>8} "
          f"{'goal':>5} {'orig':>5} {'TFLOP/s':>8} {'loss first->last':>18} ok")
    for r in results["rows"]:
        g, b = (GOALS.get(r["config"], {}), BASELINE.get(r["config"], {})) if goals else ({}, {})
        ok = "-" if r["meets_goal"] is None else "yes" if r["meets_goal"] else "NO"
        print(f"{r['config']:3} {r['batch']:>5} {str(r['gradient_checkpointing']):>5} {r['tokens_per_second']:>9,} "
              f"{g.get('tokens_per_second', '-'):>7} {b.get('tokens_per_second', '-'):>7} {r['step_ms']:>8} "
              f"{str(r['peak_gb']):>8} {g.get('peak_gb', '-'):>5} {b.get('peak_gb', '-'):>5} "
              f"{str(r.get('model_tflops', '-')):>8} {r['first_loss']:>8.4f}->{r['last_loss']:<8.4f} {ok}")


if __name__ == "__main__":
    main()
