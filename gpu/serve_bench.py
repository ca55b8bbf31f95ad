"""Serving benchmark (issue 6): the continuous-batching engine on a full-size ChatGLM-6B with random
float16 weights, in process (no HTTP).

Measures output tokens/s at 1/8/32/128 concurrent streams (128-token prompts, exactly 128-token
answers: <eop> is not a stop token here), time per output token (per request, p50/p99), the gap
between a stream's tokens (p50/p99) and time to first token; then batch-1 latency of the engine
against the plain `generate` path (its default fast path, and eager). Decode modes: the server's
default ("compile" on CUDA: compiled at engine start, the start's time recorded) for every level,
"graphs" (no compile) at 1 and 128 streams. Each section fails on its own (the error is recorded,
the rest runs).

With --attention, first decode attention alone: the Triton kernel against the PyTorch path of
ops.attend at batch 1 / 2k context and 128 rows / 256 columns, with a sweep of the kernel's
tile sizes and splits ($CHATGLM_FT_DECODE_ATTENTION=torch runs the engine levels on the PyTorch path).
--attention --grouped runs only that, for ChatGLM2/3-6B's grouped heads (32 query heads over 2 KV
heads, the grouped kernel) and writes $OUT/attention_grouped.json.

    python3 gpu/serve_bench.py            # writes $OUT/serve_bench.json when $OUT is set
    python3 gpu/serve_bench.py --config chatglm3 --levels 1,128   # ChatGLM3-6B: $OUT/serve_bench_chatglm3.json
    python3 gpu/serve_bench.py --quantize int4 --levels 1,128 --engine-only   # $OUT/serve_bench_int4.json
    python3 gpu/serve_bench.py --levels 128 --engine-only --max-context 2048   # slots of 2048 tokens: as many as fit
    python3 gpu/serve_bench.py --levels 128 --engine-only --prompt 1024   # 1024-token prompts (default 128)
    python3 gpu/serve_bench.py --attention --grouped   # ChatGLM2/3's decode attention alone (about a minute)
    python3 gpu/serve_bench.py --smoke    # the same code paths on a tiny model, on the CPU (seconds)

--config NAME picks the shape (`chatglm-ft bench --config`'s names: full = ChatGLM-6B, the default; chatglm2,
chatglm3; with --smoke the tiny shape of the same generation). Each level records the memory ceiling:
streams x bandwidth / (weight bytes + streams x KV bytes of the mean context), KV bytes from the config's
key/value heads (ChatGLM2/3's 2 groups: 16x less cache than ChatGLM-6B's 32 heads).

Finishes in about 5 minutes on an H200; prints a table last.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run from a checkout without installing; $CHATGLM_FT_SRC runs another source tree (gpu/ab_bench.py)
sys.path.insert(0, os.environ.get("CHATGLM_FT_SRC") or str(REPO / "src"))

import torch  # noqa: E402

from chatglm_ft.bench import kv_bytes_per_token, measure_bandwidth, random_model, weight_bytes  # noqa: E402
from chatglm_ft.commands.bench import BENCH_CONFIGS, bench_config  # noqa: E402
from chatglm_ft.config import ChatGLMConfig  # noqa: E402
from chatglm_ft.engine import Engine  # noqa: E402
from chatglm_ft.generate import GenerationConfig  # noqa: E402
from chatglm_ft.positions import PrefixLayout, attention_mask_for  # noqa: E402
from chatglm_ft.tokenizers import load_tokenizer  # noqa: E402
from graph_timing import graph_seconds  # noqa: E402  (gpu/, the script's own folder)

PROMPT_TOKENS, ANSWER_TOKENS = 128, 128
LEVELS = (1, 8, 32, 128)
BUDGET_SECONDS = 270  # stop starting optional sections after this (225 before the attention section came first)
BEGAN = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - BEGAN


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def family(config) -> str:
    return config.family if hasattr(config, "family") else "chatglm"


def find_tokenizer(config=None):
    """The real tokenizer of the model's generation from the shared golden checkpoints, so detokenizing costs
    what it costs in the server."""
    name = f"{family(config) if config is not None else 'chatglm'}-6b-tiny"
    for root in (os.environ.get("CHATGLM_FT_SHARED"), REPO / "shared", REPO.parent / "shared"):
        if root and (Path(root) / "golden" / name / "tokenizer_config.json").exists():
            return load_tokenizer(Path(root) / "golden" / name)
    return None


def prompts(config, n: int, seed: int, length: int = PROMPT_TOKENS) -> list[list[int]]:
    """n random prompts of `length` ids shaped as the generation's prompts: ChatGLM-6B's end with
    [gMASK] <sop>, ChatGLM2/3's start with [gMASK] sop (text ids only in between)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(config, ChatGLMConfig):
        body = torch.randint(20000, 120000, (n, length - 2), generator=g).tolist()
        return [row + [config.gmask_token_id, config.bos_token_id] for row in body]
    from chatglm_ft.random_data import GLM2_HIGHEST_ID, GLM2_PREFIX  # here: $CHATGLM_FT_SRC may be an older tree

    body = torch.randint(1000, GLM2_HIGHEST_ID, (n, length - 2), generator=g).tolist()
    return [list(GLM2_PREFIX) + row for row in body]


def add_ceilings(results: dict, *, weights: int, kv_per_token: int, bandwidth: float, answer: int, prompt: int) -> None:
    """Each level's memory ceiling: a decode step reads the weights once and every stream's KV cache up to
    its column (mean context: the prompt + half the answer), and yields one token per stream."""
    context = prompt + (answer - 1) / 2
    for section_ in results.values():
        for level in section_.get("levels", []) if isinstance(section_, dict) else ():
            step_bytes = weights + level["streams"] * kv_per_token * context
            level["memory_ceiling_tokens_per_s"] = level["streams"] * bandwidth / step_bytes
            level["ceiling_fraction"] = level["tokens_per_s"] / level["memory_ceiling_tokens_per_s"]


def option(argv: list[str], name: str) -> str | None:
    """--name=value or --name value."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def bench_model_config(name: str, smoke: bool):
    """The config `--config name` names; --smoke: the tiny shape of the same generation."""
    if name not in BENCH_CONFIGS:
        raise SystemExit(f"error: --config {name!r}: choose one of {', '.join(BENCH_CONFIGS)}")
    if smoke and not name.endswith("tiny"):
        name = "tiny" if name in ("full", "mid") else f"{name}-tiny"
    return bench_config(name)


def build(config, smoke: bool, quantize: str | None = None):
    """Random weights of `config` (float16 on the GPU; float32 on the CPU for --smoke), in eval mode;
    `quantize` ("int8", "int4"): its layers built quantized, as `chatglm-ft bench --quantize` does."""
    from chatglm_ft.bench import random_quantized_model
    from chatglm_ft.commands.options import kernel_options

    dtype, device = (torch.float32, torch.device("cpu")) if smoke else (torch.float16, torch.device("cuda"))
    if quantize:
        model = random_quantized_model(config, quantize, dtype=dtype, device=device)
    else:
        model = random_model(config, dtype=dtype, device=device)
    return model.use_kernels(kernel_options())  # $CHATGLM_FT_NEW_KERNELS etc., as the CLI reads them


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def run_level(engine: Engine, config: ChatGLMConfig, streams: int, answer: int, seed: int, prompt: int) -> dict:
    gen = GenerationConfig(max_new_tokens=answer, stop_token_ids=())
    batch = prompts(config, streams, seed, prompt)
    sync()
    began = time.perf_counter()
    handles = [engine.submit(p, gen) for p in batch]
    results = [h.result(600) for h in handles]
    wall = time.perf_counter() - began
    bad = [r.finish_reason for r in results if r.finish_reason != "length" or r.completion_tokens != answer]
    if bad:
        raise RuntimeError(f"{len(bad)} requests did not finish normally: {bad[:3]} {[r.error for r in results][:1]}")
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in results]
    gaps = [b - a for r in results for a, b in zip(r.token_times, r.token_times[1:])]
    ttft = [r.first_token_seconds for r in results]
    tokens = sum(r.completion_tokens for r in results)
    return {
        "streams": streams, "output_tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
        "tpot_ms_p50": 1e3 * percentile(tpot, 50), "tpot_ms_p99": 1e3 * percentile(tpot, 99),
        "token_gap_ms_p50": 1e3 * percentile(gaps, 50), "token_gap_ms_p99": 1e3 * percentile(gaps, 99),
        "ttft_ms_p50": 1e3 * percentile(ttft, 50), "ttft_ms_p99": 1e3 * percentile(ttft, 99),
    }


def profile_level(engine: Engine, config: ChatGLMConfig, streams: int, answer: int, prompt: int) -> dict:
    """One level under torch.profiler (CUDA activity only, so the host side runs at its own speed):
    how busy the GPU is and which kernels take its time."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU  # CPU: the smoke run
    with profile(activities=[activity]) as prof:
        level = run_level(engine, config, streams, answer, seed=5000 + streams, prompt=prompt)
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    level["gpu_busy"] = gpu_us / 1e6 / level["seconds"]
    table = events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60)
    print(f"  profile of {streams} streams: GPU busy {level['gpu_busy']:.0%} of {level['seconds']:.2f} s\n{table}",
          file=sys.stderr, flush=True)
    return level


HEADROOM_BYTES = 6 << 30  # GPU memory left beside the KV cache: the 16,384-token prefill's activations and logits


def slots_that_fit(model, context: int, wanted: int) -> int:
    """KV-cache slots of `context` tokens that fit in the GPU memory left (HEADROOM_BYTES kept free), at most
    `wanted`: how many requests a server with `--max-context context` can decode at once on this card."""
    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 1 << 40
    per_slot = kv_bytes_per_token(model) * (context + 1)
    fit = (free - HEADROOM_BYTES) // per_slot
    if fit < 1:
        raise RuntimeError(f"not one {context}-token KV-cache slot fits in {free / 1e9:.1f} GB")
    return int(min(wanted, fit))


def engine_levels(model, tokenizer, config, decode: str, levels, answer: int, profile: bool = False,
                  context: int | None = None, prompt: int = PROMPT_TOKENS) -> dict:
    """Warm up each level (captures its graphs), then time it. `context`: every slot holds that many tokens (a
    server's --max-context) and only the slots that fit are made, so more streams than slots queue; default:
    the benchmark's prompt + answer, one slot per stream."""
    began = time.perf_counter()
    context = context or prompt + answer
    slots = slots_that_fit(model, context, max(levels))
    engine = Engine(model, tokenizer, max_batch=slots, max_queue=max(levels), max_context=context, decode=decode).start()
    out = {"decode": engine.decode_mode, "start_warm_up_seconds": engine.warm_up_seconds, "context": context,
           "slots": slots, "levels": []}
    try:
        # engine start to the first whole answer (16 tokens, fewer in a short run): what a user waits for after the model is loaded
        engine.generate(prompts(config, 1, seed=99, length=prompt)[0], GenerationConfig(max_new_tokens=min(16, answer), stop_token_ids=()), 600)
        out["start_to_first_answer_seconds"] = time.perf_counter() - began
        if not engine.compile_done.is_set():  # compiling in the background: time the steady state after it
            began = time.perf_counter()
            engine.compile_done.wait()
            out["background_compile_seconds"] = time.perf_counter() - began
            out["compile_error"] = engine.compile_error
        for streams in levels:
            began = time.perf_counter()
            run_level(engine, config, streams, min(16, answer), seed=streams, prompt=prompt)  # warm-up: same batch and attention buckets
            warm = time.perf_counter() - began
            level = run_level(engine, config, streams, answer, seed=1000 + streams, prompt=prompt)
            level["warmup_seconds"] = warm
            out["levels"].append(level)
            print(f"  [{decode}] {streams:>3} streams: {level['tokens_per_s']:8.0f} tok/s, TPOT p50 "
                  f"{level['tpot_ms_p50']:.2f} ms (warm-up {warm:.1f} s)", file=sys.stderr, flush=True)
        if profile:
            out["profile"] = profile_level(engine, config, levels[-1], answer, prompt)
    finally:
        engine.stop(drain=False, timeout=60)
        out["graphs_captured"] = len(engine._graphs.graphs) if engine._graphs is not None else 0
    return out


def generate_latency(model, config, *, fast: bool | None, answer: int) -> dict:
    """Batch-1 time per output token of plain `generate` (after one warm-up run that compiles/captures)."""
    from chatglm_ft.generate import stream_tokens

    prompt = prompts(config, 1, seed=7)
    gen = GenerationConfig(max_new_tokens=answer, stop_token_ids=())

    def once() -> tuple[float, float]:
        sync()
        began = time.perf_counter()
        times = []
        for _ in stream_tokens(model, prompt, gen, fast=fast):
            times.append(time.perf_counter())
        return (times[-1] - times[0]) / (len(times) - 1), times[0] - began

    began = time.perf_counter()
    once()
    warm = time.perf_counter() - began
    tpot, ttft = once()
    return {"fast": fast, "tpot_ms": 1e3 * tpot, "ttft_ms": 1e3 * ttft, "warmup_seconds": warm}


# engine: columns 128..255 as at 128 streams; (1, 256): batch-1 decode at a short context, the first attention
# bucket (is splitting its few tiles, and the combine kernel that follows, worth it there?)
ATTENTION_CASES = ((1, 2048, "full"), (1, 256, "full"), (128, 256, "full"), (128, 256, "engine"))


def attention_microbench(config: ChatGLMConfig, cases=ATTENTION_CASES, device: str = "cuda", kv_heads: int | None = None
                         ) -> dict:
    """Decode attention alone, one layer: the Triton kernel (decode_attention.py, with a sweep of its
    tile sizes and splits) against the PyTorch path of `ops.attend`. GB/s counts the K and V bytes
    of the visible columns. Each timed call reads a different copy of the cache (>= 256 MB in all),
    so the numbers come from HBM, not from the 50 MB L2 (batch 1 at 2k context is 32 MB per layer).
    `kv_heads` < the query heads: grouped KV heads (ChatGLM2/3: 2), the grouped kernel."""
    from chatglm_ft import decode_attention as da
    from chatglm_ft.ops import attend
    from chatglm_ft.options import KernelOptions

    nh, hd = config.num_attention_heads, config.head_dim
    nkv = kv_heads or nh
    torch_path = KernelOptions(decode_attention="torch")
    out: dict = {"query_heads": nh, "kv_heads": nkv, "head_dim": hd, "cases": []}
    for B, S, kind in cases:
        per_copy = 2 * B * nkv * (S + 1) * hd * 2
        copies = max(2, -(-256 * 2**20 // per_copy))
        caches = [(torch.randn(B, nkv, S + 1, hd, device=device, dtype=torch.float16),
                   torch.randn(B, nkv, S + 1, hd, device=device, dtype=torch.float16)) for _ in range(copies)]
        kv = [(k[:, :, :S], v[:, :, :S]) for k, v in caches]  # cache views with the scratch column's row stride
        q = torch.randn(B, 1, nh, hd, device=device, dtype=torch.float16).transpose(1, 2)
        if kind == "full":
            column = torch.full((B, 1), S - 1, device=device)
        else:
            column = torch.randint(S // 2, S, (B, 1), device=device)
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        mask = attention_mask_for(PrefixLayout(start=zeros, context=zeros + 1, mask=zeros), column, S)
        visible_bytes = 2 * nkv * hd * 2 * int(mask.sum())
        reference = da.decode_attention_reference(q, *kv[0], mask).float()
        row = {"batch": B, "kv_length": S, "mask": kind, "copies": copies, "visible_mb": visible_bytes / 1e6, "variants": []}

        def record(name: str, fn) -> None:
            try:
                error = ((fn(*kv[0]).float() - reference).abs().max() / reference.abs().max()).item()
                seconds = graph_seconds([lambda k=k, v=v: fn(k, v) for k, v in kv] * max(1, 64 // copies))
                row["variants"].append({"name": name, "us": seconds * 1e6, "gb_per_s": visible_bytes / seconds / 1e9,
                                        "rel_error": error})
            except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported, not fatal
                row["variants"].append({"name": name, "error": f"{type(e).__name__}: {e}"[:300]})

        record("torch", lambda k, v: attend(q, k, v, mask, torch_path))
        record("triton", lambda k, v: torch.ops.chatglm_ft.decode_attention(q, k, v, mask))
        if nkv == nh:
            splits_sweep = (None,) if B * nh >= 1024 else (None, 1, 2, 4, 8, 16, 32)
        else:  # (row, KV head) programs: 2 at batch 1, 256 at 128 rows
            splits_sweep = (None, 1, 2, 4, 8, 16, 32) if B * nkv < 132 else (None, 1, 2, 4)
        for block_s in (32, 64, 128):
            for warps in (4, 8):
                for splits in splits_sweep:
                    name = f"triton block_s={block_s} warps={warps} splits={splits or 'auto'}"
                    record(name, lambda k, v, b=block_s, w=warps, n=splits: da.decode_attention(
                        q, k, v, mask, block_s=b, splits=n, num_warps=w))
                for stages in ((2, 4) if nkv < nh else ()):  # the grouped kernel's pipelined loads (default 3)
                    name = f"triton block_s={block_s} warps={warps} splits=auto stages={stages}"
                    record(name, lambda k, v, b=block_s, w=warps, n=stages: da.decode_attention(
                        q, k, v, mask, block_s=b, num_warps=w, num_stages=n))
        timed = [v for v in row["variants"] if "us" in v]
        kernels = [v for v in timed if v["name"] != "torch"]
        best = min(kernels, key=lambda v: v["us"]) if kernels else None
        row["best"] = best["name"] if best else None
        out["cases"].append(row)
        torch_us = next((v["us"] for v in timed if v["name"] == "torch"), None)
        triton_us = next((v["us"] for v in timed if v["name"] == "triton"), None)
        print(f"  attention B={B} S={S} ({kind}): torch {torch_us or float('nan'):.1f} us, triton "
              f"{triton_us or float('nan'):.1f} us, best {best['name'] if best else '-'} "
              f"{best['us'] if best else float('nan'):.1f} us", file=sys.stderr, flush=True)
        del caches, kv
    return out


def section(results: dict, name: str, fn, *args, **kwargs) -> None:
    if elapsed() > BUDGET_SECONDS:
        results[name] = {"skipped": f"time budget ({elapsed():.0f} s used)"}
        return
    began = time.perf_counter()
    try:
        results[name] = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a benchmark records a failing section and goes on
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"}
    results[name]["section_seconds"] = time.perf_counter() - began
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str]) -> int:
    smoke = "--smoke" in argv
    if not smoke and not torch.cuda.is_available():
        print("serve_bench needs a CUDA GPU (or --smoke for a CPU run of the same code)", file=sys.stderr)
        return 1
    if "--grouped" in argv:  # ChatGLM2/3-6B's decode attention alone: 32 query heads over 2 KV heads
        from chatglm_ft.config_glm2 import ChatGLM2Config

        glm2 = ChatGLM2Config()
        results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "total_seconds": 0.0}
        section(results, "attention", attention_microbench, glm2, kv_heads=glm2.kv_heads)
        results["total_seconds"] = elapsed()
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "attention_grouped.json").write_text(json.dumps(results, indent=2))
        print_attention(results)
        return 0
    config_name = option(argv, "--config") or "full"
    config = bench_model_config(config_name, smoke)
    levels, answer = ((1, 4), 8) if smoke else (LEVELS, ANSWER_TOKENS)
    if option(argv, "--levels"):  # --levels 1,128 and --answer N: a shorter run (gpu/ab_bench.py)
        levels = tuple(int(x) for x in option(argv, "--levels").split(","))
    if option(argv, "--answer"):
        answer = int(option(argv, "--answer"))
    # --prompt 1024: long chat histories, where the KV cache (not the weights) bounds a step
    prompt = int(option(argv, "--prompt") or PROMPT_TOKENS)
    quantize = option(argv, "--quantize")  # int8 / int4: the engine on a quantized model
    if quantize not in (None, "int8", "int4"):
        raise SystemExit(f"error: --quantize {quantize!r}: choose int8 or int4")
    json_name = ("serve_bench" + ("" if config_name == "full" else f"_{config_name}")
                 + (f"_{quantize}" if quantize else "") + ".json")
    torch.manual_seed(0)
    model = build(config, smoke, quantize)
    tokenizer = find_tokenizer(config)
    weights, kv_per_token = weight_bytes(model), kv_bytes_per_token(model)
    bandwidth = measure_bandwidth(model.device)
    results: dict = {
        "config": config_name, "quantize": quantize, "family": family(config), "layers": config.num_layers,
        "query_heads": config.num_attention_heads, "kv_heads": getattr(config, "kv_heads", config.num_attention_heads),
        "weight_bytes": weights, "kv_bytes_per_token": kv_per_token, "bandwidth": bandwidth,
        "device": "cpu (smoke)" if smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
        "dtype": str(model.dtype), "prompt_tokens": prompt, "answer_tokens": answer, "tokenizer": tokenizer is not None,
        "model_build_seconds": elapsed(),
    }
    print(f"model built in {elapsed():.0f} s; tokenizer {'found' if tokenizer else 'not found (tokens only)'}",
          file=sys.stderr, flush=True)
    results["decode_attention"] = os.environ.get("CHATGLM_FT_DECODE_ATTENTION", "triton")  # what the engine levels use
    results["kernels"] = repr(model.kernels)
    if "--profile" in argv:  # only the top level, profiled (what bounds 128 streams)
        section(results, "engine_default", engine_levels, model, tokenizer, config, "auto", (levels[-1],), answer,
                profile=True, prompt=prompt)
        add_ceilings(results, weights=weights, kv_per_token=kv_per_token, bandwidth=bandwidth, answer=answer, prompt=prompt)
        results["total_seconds"] = elapsed()
        print_table(results)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "serve_profile.json").write_text(json.dumps(results, indent=2))
        return 0
    if not smoke and "--attention" in argv:  # the kernel needs a GPU (the smoke's CPU engine runs the PyTorch path)
        section(results, "attention", attention_microbench, config, kv_heads=getattr(config, "kv_heads", None))
    # the headline numbers first (the server's default: compile on CUDA, eager on the CPU); each engine is
    # stopped before the next section sets up its own cache
    context = int(option(argv, "--max-context")) if option(argv, "--max-context") else None
    section(results, "engine_default", engine_levels, model, tokenizer, config, "auto", levels, answer, context=context,
            prompt=prompt)
    if "--engine-only" in argv:  # the default engine's levels only
        add_ceilings(results, weights=weights, kv_per_token=kv_per_token, bandwidth=bandwidth, answer=answer, prompt=prompt)
        results["total_seconds"] = elapsed()
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], os.environ.get("SERVE_BENCH_NAME", json_name)).write_text(
                json.dumps(results, indent=2))
        print_table(results)
        return 0
    section(results, "generate_fast", generate_latency, model, config, fast=None, answer=answer)
    if not smoke:
        section(results, "engine_graphs", engine_levels, model, tokenizer, config, "graphs", (levels[0], levels[-1]), answer,
                prompt=prompt)
    section(results, "generate_eager", generate_latency, model, config, fast=False, answer=answer)
    add_ceilings(results, weights=weights, kv_per_token=kv_per_token, bandwidth=bandwidth, answer=answer, prompt=prompt)
    results["total_seconds"] = elapsed()
    results["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], json_name).write_text(json.dumps(results, indent=2))
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    print(f"\nserve_bench of {results.get('config', 'full')} on {results['device']} (torch {results['torch']}), "
          f"{results['dtype']} random weights, "
          f"{results['prompt_tokens']}-token prompts, {results['answer_tokens']}-token answers, total {results['total_seconds']:.0f} s")
    print(f"{'decode':<8} {'streams':>7} {'tok/s':>9} {'ceiling':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'gap p99':>8} "
          f"{'TTFT p50':>9}  (ms; ceiling: memory-bound tok/s)")
    for key in ("engine_default", "engine_graphs", "engine_eager", "engine_compile"):
        section_ = results.get(key, {})
        if not section_:
            continue
        if "levels" not in section_:
            print(f"{key:<16} {section_.get('error') or section_.get('skipped')}")
            continue
        if section_.get("slots") and section_["slots"] < max(lv["streams"] for lv in section_["levels"]):
            print(f"({section_['slots']} slots of {section_['context']} tokens fit: more streams queue)")
        for lv in section_["levels"]:
            print(f"{section_['decode']:<8} {lv['streams']:>7} {lv['tokens_per_s']:>9.0f} "
                  f"{lv.get('memory_ceiling_tokens_per_s', float('nan')):>9.0f} {lv['tpot_ms_p50']:>9.2f} "
                  f"{lv['tpot_ms_p99']:>9.2f} {lv['token_gap_ms_p99']:>8.2f} {lv['ttft_ms_p50']:>9.1f}")
    for key in ("generate_fast", "generate_eager"):
        g = results.get(key, {})
        print(f"{key:<16} " + (f"batch-1 {g['tpot_ms']:.2f} ms/token" if "tpot_ms" in g else str(g.get("error") or g.get("skipped"))))
    reference = results.get("generate_fast", {}).get("tpot_ms")
    for key in ("engine_default", "engine_graphs", "engine_compile"):
        levels = results.get(key, {}).get("levels", [])
        one = next((lv for lv in levels if lv["streams"] == 1), None)
        if one and reference:
            print(f"batch-1 {key} / generate: {one['tpot_ms_p50'] / reference:.2f}x (goal <= 1.10)")
    print_attention(results)
    top = next((lv for lv in results.get("engine_default", {}).get("levels", []) if lv["streams"] == 128), None)
    if top:
        goal = " (goal >= 15000)" if results.get("config", "full") == "full" else ""
        print(f"128 streams: {top['tokens_per_s']:.0f} output tokens/s{goal}")


def print_attention(results: dict) -> None:
    attention = results.get("attention", {})
    if "error" in attention:
        print(f"attention: {attention['error']}")
    heads = ""
    if "kv_heads" in attention:
        heads = f" ({attention['query_heads']} query heads, {attention['kv_heads']} KV heads)"
    for case in attention.get("cases", []):
        timed = {v["name"]: v for v in case["variants"] if "us" in v}
        line = "  ".join(f"{name} {timed[name]['us']:.1f} us ({timed[name]['gb_per_s']:.0f} GB/s)"
                         for name in dict.fromkeys(("torch", "triton", case["best"])) if name in timed)
        print(f"attention{heads} B={case['batch']} S={case['kv_length']} {case['mask']}: {line}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
