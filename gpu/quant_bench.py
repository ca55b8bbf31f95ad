"""INT8/INT4 quantization on one GPU (issue 3), full-size ChatGLM-6B with random weights.

1. kernels: the Triton GEMV / dequantize kernels against the PyTorch reference (relative error)
   on the model's shapes (qkv 12288x4096, dense 4096x4096, h_to_4h 16384x4096, 4h_to_h 4096x16384,
   lm_head 130528x4096), and their speed (CUDA graph of back-to-back calls on rotating weight copies
   so that L2 does not help) next to float16 cuBLAS: GB/s and the implied weights-only ms/token.
2. variants fp16 / int8 / int4 (and with --quantize-embeddings): a load that goes through the
   library's own layer-by-layer placement (random float16 tensors handed over from host memory,
   as a checkpoint shard would), then a 2048-token chat (1536-token prompt + 512 new tokens) through
   the project's generate path -> peak GPU memory; then batch-1 decode tokens/s (32-token prompt,
   200 new tokens, warm) with the default (compiled, CUDA-graph) path and the eager one.
(Tile sweeps of the kernels: gpu/gemv_sweep.py.)

    python3 gpu/quant_bench.py [--parts kernels,variants] [--variants fp16,int4,int8,int4+emb,int8+emb]
                               [--budget 200]

Parts and variants run in that order until --budget seconds have passed (compiling the decode
step takes most of a variant's time on a cold cache), so a 4-minute run covers the kernels and
fp16/int4/int8; for the rest: `--parts variants --variants int4+emb,int8+emb`.
Every part catches its own errors and the run continues. Writes $OUT/quant_bench.json when $OUT
is set; prints a table last.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from graph_timing import graph_seconds  # noqa: E402  (gpu/, the script's own folder)

from chatglm_ft import kernels  # noqa: E402
from chatglm_ft.checkpoint import assign_tensor, expected_shapes  # noqa: E402
from chatglm_ft.config import ChatGLMConfig  # noqa: E402
from chatglm_ft.generate import GenerationConfig, stream_tokens  # noqa: E402
from chatglm_ft.model import ChatGLMForConditionalGeneration  # noqa: E402
from chatglm_ft.quantize import (  # noqa: E402
    Placer, QuantScheme, StoredFormat, dequantize_reference, finish_loading, quantize_int4, quantize_int8,
    quantized_skeleton,
)

SHAPES = {"qkv": (12288, 4096), "dense": (4096, 4096), "h_to_4h": (16384, 4096), "4h_to_h": (4096, 16384),
          "lm_head": (130528, 4096)}
LAYERS = 28
GOALS = {"int8": {"tokens_per_s": 520, "peak_gb": 8.0}, "int4": {"tokens_per_s": 800, "peak_gb": 4.5}}
GB = 1e9
START = time.perf_counter()
DEVICE = torch.device("cuda")  # --smoke: cpu
results: dict = {"torch": torch.__version__, "errors": []}


# allocator statistics (zero on the CPU, where --smoke only checks that the code runs)
def allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0


def peak_allocated() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else 0


def reset_peak() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def elapsed() -> float:
    return time.perf_counter() - START


def guarded(label: str, fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # a benchmark reports every failure and goes on
        message = f"{label}: {type(e).__name__}: {e}"
        print("ERROR", message, file=sys.stderr)
        traceback.print_exc()
        results["errors"].append(message[:2000])
        free_memory()
        return None


# -- 1. kernels ----------------------------------------------------------------------------------
def quantized_weight(bits: int, n: int, k: int):
    w = torch.randn(n, k, device="cuda") / k**0.5
    return quantize_int8(w) + (None,) if bits == 8 else quantize_int4(w, 128)


def gemv(bits, x, q, scale, zero, bias=None, config=None):
    if config is not None:
        return kernels.skinny_matmul(x, q, scale, zero, bias, config)
    return torch.ops.chatglm_ft.gemv(x, q, bias, 0, scale, zero)


def check_kernels() -> dict:
    out = {}
    torch.manual_seed(0)
    for bits in (8, 4):
        for name, (n, k) in SHAPES.items():
            q, scale, zero = quantized_weight(bits, n, k)
            bias = torch.randn(n, device="cuda", dtype=torch.float16)
            reference_w = dequantize_reference(q, scale, zero, torch.float64)
            row = {}
            for rows in (1, 3):
                x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
                y = gemv(bits, x, q, scale, zero, bias).double()
                ref = x.double() @ reference_w.T + bias.double()
                row[f"gemv_rel_err_m{rows}"] = ((y - ref).norm() / ref.norm()).item()
            row["dequantize_bit_exact"] = bool(torch.equal(
                kernels.dequantize(q, scale, zero, torch.float16), dequantize_reference(q, scale, zero, torch.float16)))
            out[f"int{bits} {name}"] = row
            del q, scale, zero, reference_w
    torch.cuda.empty_cache()
    return out


def graph_time_ms(fn, copies: int, calls: int = 24, replays: int = 5) -> float:
    """Milliseconds per call of fn(i) (i picks a weight copy), from a CUDA graph of `calls` calls."""
    return graph_seconds([lambda i=i: fn(i % copies) for i in range(calls)], replays) * 1e3


def weight_bytes(bits: int, n: int, k: int) -> int:
    return {16: 2 * n * k, 8: n * k + 2 * n, 4: n * k // 2 + 3 * n * (k // 128)}[bits]


def kernel_speed(configs: dict | None = None) -> dict:
    """Per shape and width: ms per call, GB/s; then weights-only ms/token for the whole model."""
    out = {}
    for bits in (16, 8, 4):
        for name, (n, k) in SHAPES.items():
            size = weight_bytes(bits, n, k)
            copies = max(1, min(16, -(-320_000_000 // size)))  # > 300 MB in rotation: nothing stays in L2
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            if bits == 16:
                ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies)]
                ms = graph_time_ms(lambda i: F.linear(x, ws[i]), copies)
            else:
                ws = [quantized_weight(bits, n, k) for _ in range(copies)]
                ms = graph_time_ms(lambda i: gemv(bits, x, *ws[i]), copies)
            out[f"{'fp16' if bits == 16 else f'int{bits}'} {name}"] = {"ms": ms, "GB_per_s": size / ms / 1e6}
            ws = None  # free the copies before the next shape
            torch.cuda.empty_cache()
    for label in ("fp16", "int8", "int4"):
        layers = LAYERS * sum(out[f"{label} {s}"]["ms"] for s in ("qkv", "dense", "h_to_4h", "4h_to_h"))
        for head in {"fp16", label}:
            ms = layers + out[f"{head} lm_head"]["ms"]
            out[f"{label} layers + {head} lm_head per token"] = {"ms": ms, "tokens_per_s_ceiling": 1000 / ms}
    return out


# (rows, columns) per loop step, from long thin row slices to square tiles of about 2-8 KB of weights
# -- 2. variants ---------------------------------------------------------------------------------
def random_tensor(name: str, shape) -> torch.Tensor:
    """~N(0, 0.02) weights, layernorm weights 1, biases 0; made on the GPU, handed over from host memory."""
    t = torch.empty(shape, device=DEVICE, dtype=torch.float16)
    if "layernorm" in name and name.endswith("weight"):
        t.fill_(1.0)
    elif name.endswith("bias"):
        t.zero_()
    else:
        t.normal_(0, 0.02)
    return t.cpu()


def load_random(config: ChatGLMConfig, scheme: QuantScheme | None) -> tuple[ChatGLMForConditionalGeneration, float]:
    """The model through the library's placement (lm_head tied, as released); returns it and the
    peak bytes allocated while placing (the random tensors' own creation excluded)."""
    device, dtype = DEVICE, torch.float16 if DEVICE.type == "cuda" else torch.float32
    if scheme is None:
        model = ChatGLMForConditionalGeneration(config, device="meta")
        place = lambda name, t: assign_tensor(model, name, t.to(device=device, dtype=dtype))  # noqa: E731
    else:
        model, _ = quantized_skeleton(config, scheme)
        place = Placer(model, scheme, StoredFormat("float"), dtype=dtype, device=device, source="random")
    peak = 0
    for name, shape in expected_shapes(config).items():
        if name == "lm_head.weight":
            continue
        tensor = random_tensor(name, shape)
        reset_peak()
        place(name, tensor)
        peak = max(peak, peak_allocated())
        del tensor
    model.tie_lm_head()
    if scheme is None:
        model.reset_buffers()
    else:
        finish_loading(model, scheme, dtype=dtype, device=device, source="random")
    return model.eval(), peak


def decode(model, prompt_length: int, new_tokens: int, fast: bool | None = None) -> dict:
    """Run the project's generate path with the stop token disabled; time the decode steps."""
    config = model.config
    ids = torch.randint(20, 130000, (prompt_length - 2,), generator=torch.Generator().manual_seed(0)).tolist()
    ids += [config.gmask_token_id, config.bos_token_id]
    gen = GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=())
    kwargs = {} if fast is None else {"fast": fast}
    start = time.perf_counter()
    tokens, times = [], []
    for (token,) in stream_tokens(model, [ids], gen, **kwargs):
        times.append(time.perf_counter())
        tokens.append(token)
    n = len(times)
    return {"tokens": n, "first_token_s": times[0] - start,
            "tokens_per_s": (n - 1) / (times[-1] - times[0]) if n > 1 else None, "ids": tokens}


@torch.no_grad()
def last_logits(model) -> torch.Tensor:
    """Last-position logits of a fixed 64-token prompt (eager forward), to compare variants."""
    config = model.config
    ids = torch.randint(20, 130000, (62,), generator=torch.Generator().manual_seed(1)).tolist()
    ids = torch.tensor([ids + [config.gmask_token_id, config.bos_token_id]], device=DEVICE)
    return model(ids).logits[0, -1].float().cpu()


LOGITS: dict[str, torch.Tensor] = {}


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"cosine": F.cosine_similarity(a.double(), b.double(), dim=0).item(),
            "max_abs_diff": (a - b).abs().max().item(), "top1_equal": bool(a.argmax() == b.argmax())}


def run_variant(label: str) -> dict:
    config = ChatGLMConfig.tiny() if ARGS.smoke else ChatGLMConfig.full()
    scheme = None if label == "fp16" else QuantScheme(bits=int(label[3]), embeddings=label.endswith("+emb"))
    free_memory()
    base = allocated()
    t0 = time.perf_counter()
    torch.manual_seed(0)  # every variant gets the same random weights
    model, load_peak = load_random(config, scheme)
    out = {"load_s": time.perf_counter() - t0, "model_gb": (allocated() - base) / GB,
           "load_peak_gb": (load_peak - base) / GB}
    reset_peak()
    short = 16 if ARGS.smoke else 1  # --smoke: a few tokens only
    chat = decode(model, 1536 // short, 512 // short)  # 2048 tokens in all: the longest chat the model takes
    out["chat_2048"] = chat
    out["load_and_chat_peak_gb"] = (max(load_peak, peak_allocated()) - base) / GB
    if DEVICE.type == "cuda":
        out["reserved_peak_gb"] = torch.cuda.max_memory_reserved() / GB
        free, total = torch.cuda.mem_get_info()
        out["device_used_gb_after_chat"] = (total - free) / GB  # what nvidia-smi shows: + CUDA context, graphs
    decode(model, 32, 200 // short)  # warm: the short context's attention bucket
    out["decode"] = decode(model, 32, 200 // short)
    if elapsed() < ARGS.budget:
        out["decode_eager"] = eager = decode(model, 32, 64 // short, fast=False)
        fast_ids = out["decode"]["ids"]
        out["eager_equals_default_first_tokens"] = next(
            (i for i, (a, b) in enumerate(zip(eager["ids"], fast_ids)) if a != b), len(eager["ids"]))
    LOGITS[label] = last_logits(model)
    if "fp16" in LOGITS and label != "fp16":
        out["logits_vs_fp16"] = compare(LOGITS[label], LOGITS["fp16"])
    for v in (out["chat_2048"], out["decode"], out.get("decode_eager", {})):
        v.pop("ids", None)
    model.clear_caches()
    del model
    return out


def table() -> str:
    lines = ["variant     model GB  load+chat peak GB  decode tok/s  eager tok/s  cos vs fp16  goal"]
    for label, v in results.get("variants", {}).items():
        if not v:
            lines.append(f"{label:<11} failed")
            continue
        goal = GOALS.get(label.split("+")[0], {})
        lines.append(f"{label:<11} {v['model_gb']:8.2f}  {v['load_and_chat_peak_gb']:17.2f}  "
                     f"{v['decode']['tokens_per_s'] or 0:12.1f}  {v.get('decode_eager', {}).get('tokens_per_s') or 0:11.1f}"
                     f"  {v.get('logits_vs_fp16', {}).get('cosine', float('nan')):11.5f}"
                     + (f"  >= {goal['tokens_per_s']} tok/s, <= {goal['peak_gb']} GB" if goal else ""))
    speed = results.get("kernel_speed") or {}
    lines.append("")
    lines.append("weights-only GEMV time per token (CUDA graph): " + ", ".join(
        f"{k.replace(' per token', '')}: {v['ms']:.2f} ms ({v['tokens_per_s_ceiling']:.0f}/s)"
        for k, v in speed.items() if "per token" in k))
    for name in SHAPES:
        lines.append(f"  {name:<8} " + "  ".join(
            f"{w}: {speed[f'{w} {name}']['GB_per_s']:.0f} GB/s" for w in ("fp16", "int8", "int4") if f"{w} {name}" in speed))
    checks = results.get("kernel_checks") or {}
    worst = max((v for row in checks.values() for k, v in row.items() if k.startswith("gemv")), default=None)
    exact = all(row["dequantize_bit_exact"] for row in checks.values()) if checks else None
    lines.append(f"kernel checks: worst GEMV relative error {worst}, dequantize bit-exact: {exact}")
    lines.append(f"errors: {len(results['errors'])}; total {elapsed():.0f} s")
    return "\n".join(lines)


def main() -> None:
    global DEVICE
    if ARGS.smoke:
        DEVICE = torch.device("cpu")
    results["device"] = torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu"
    print(f"{results['device']}, torch {results['torch']}", file=sys.stderr)
    parts = set(ARGS.parts.split(","))
    if DEVICE.type == "cuda" and "kernels" in parts:
        results["kernel_checks"] = guarded("kernel checks", check_kernels)
        results["kernel_speed"] = guarded("kernel speed", kernel_speed)
    results["variants"] = {}
    for label in ARGS.variants.split(",") if "variants" in parts else []:
        if elapsed() > ARGS.budget:
            results["errors"].append(f"{label}: skipped, time budget spent")
            continue
        print(f"[{elapsed():.0f}s] variant {label}", file=sys.stderr)
        results["variants"][label] = guarded(f"variant {label}", run_variant, label)
    results["seconds"] = elapsed()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "quant_bench.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("variants", "gemv_sweep") if k in results}, indent=1))
    print(table())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="fp16,int4,int8,int4+emb,int8+emb")
    parser.add_argument("--budget", type=float, default=200, help="seconds after which remaining parts are skipped")
    parser.add_argument("--parts", default="kernels,variants", help="which parts to run, comma-separated")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks that the script runs")
    ARGS = parser.parse_args()
    main()
