"""`chatglm-ft bench`: inference speed and memory against the memory-bandwidth roofline."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .options import add_compile_arg, add_model_args, apply_threads, configure_kernel_launch, kernel_options, \
    quantize_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure load time, memory, prefill latency and decode tokens/s",
        description="Benchmark inference: load time, peak memory, prefill time for 128/512/2048-token prompts, "
                    "batch-1 greedy decode tokens/s at short and at 2k context, and the fraction of the "
                    "memory-bandwidth roofline reached (weights + KV cache read once per token). "
                    "--random-weights builds a model of the published size on the device, no checkpoint needed.")
    add_model_args(p, adapter=False, ptuning=True)
    p.add_argument("--random-weights", action="store_true", help="random weights instead of a checkpoint")
    p.add_argument("--config", choices=list(BENCH_CONFIGS), default="full",
                   help="with --random-weights: the published ChatGLM-6B shape (full), a mid-size one (12 layers, hidden "
                        "1024, the real vocabulary: CPU benchmarks) or the tiny test shape (CPU CI); chatglm2 / chatglm3:"
                        " the published ChatGLM2-6B / ChatGLM3-6B shape, chatglm2-tiny / chatglm3-tiny their tiny test"
                        " shape")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded per measurement")
    p.add_argument("--prefill-lengths", default="128,512,2048", help="comma-separated prompt lengths to time")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="memory bandwidth in bytes/s for the roofline (default: measured by a device copy; "
                        "the H200 measures about 4.3e12)")
    add_compile_arg(p)
    p.add_argument("--compile-prefill", action="store_true",
                   help="also compile the prefill of single prompts longer than the prefill CUDA graphs cover "
                        "(over 512 tokens; one dynamic-shape graph for all lengths)")
    p.add_argument("--compare-eager", action="store_true", help="also time the eager decode loop")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="print torch.profiler tables of STEPS decode steps and of one prefill of the longest"
                        " length (top kernels by device time)")
    p.add_argument("--compare-quantized", action="store_true",
                   help="only decode speed, of the same weights in float, int8 and int4, interleaved in one run "
                        "(--quantize-embeddings applies to both quantized formats)")
    p.add_argument("--reference-path", action="store_true",
                   help="with --compare-quantized on the CPU: also time int8 and int4 through the dequantizing "
                        "reference path (blocks of rows dequantized, then BLAS) instead of the int8/int4 kernels")
    p.add_argument("--rounds", type=int, default=3, help="with --compare-quantized: interleaved rounds per format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--out", help="also write the JSON results to this file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..api import load, resolve_device, resolve_dtype
    from ..bench import format_report, random_model, random_quantized_model, run_bench
    from ..errors import ChatGLMError

    try:
        lengths = tuple(int(x) for x in args.prefill_lengths.split(",") if x.strip())
    except ValueError:
        raise ChatGLMError(f"--prefill-lengths {args.prefill_lengths!r}: expected comma-separated integers")
    if any(n < 2 for n in lengths) or args.decode_tokens < 2:
        raise ChatGLMError("prompt lengths and --decode-tokens must be at least 2")
    if args.random_weights == bool(args.model):
        raise ChatGLMError("pass either --model DIR or --random-weights")
    apply_threads(args)
    if args.compare_quantized:
        return compare_quantized(args)
    quantize = quantize_from_args(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    import torch._dynamo  # noqa: F401  (imported by model construction and compiling: not load time)

    began = time.perf_counter()
    if args.random_weights:
        config = bench_config(args.config)
        if quantize is None:
            model = random_model(config, dtype=dtype, device=device, seed=args.seed)
        else:  # built quantized: the float model of a full-size config may not fit where its quantized form does
            model = random_quantized_model(config, quantize, dtype=dtype, device=device, seed=args.seed)
        name = f"random weights, {args.config} config"
    else:
        model, _ = load(args.model, dtype=dtype, device=device, quantize=quantize, ptuning=args.ptuning)
        name = str(args.model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_seconds = time.perf_counter() - began

    from ..options import DecodeOptions

    configure_kernel_launch()
    model.use_kernels(kernel_options())
    fast = DecodeOptions(compile=args.compile, compile_prefill=args.compile_prefill,
                         prefill_graphs=args.prefill_graphs).validate()
    report = run_bench(
        model, model_name=name, load_seconds=load_seconds, quantize=args.quantize, prefill_lengths=lengths,
        decode_tokens=args.decode_tokens, bandwidth=args.bandwidth, fast=fast, compare_eager=args.compare_eager,
        profile_steps=args.profile, seed=args.seed,
    )
    text = json.dumps(report.to_dict(), indent=None if args.json else 2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text if args.json else format_report(report))
    if args.json and report.profile:
        print(report.profile, file=sys.stderr)
    return 0


BENCH_CONFIGS = ("full", "mid", "tiny", "chatglm2", "chatglm3", "chatglm2-tiny", "chatglm3-tiny")


def bench_config(name: str):
    from ..config import ChatGLMConfig
    from ..config_glm2 import ChatGLM2Config

    if name == "mid":  # the real format and vocabulary at a size a few CPU cores decode in a benchmark's time
        return ChatGLMConfig(num_layers=12, hidden_size=1024, num_attention_heads=8, inner_hidden_size=4096)
    if name.startswith("chatglm"):
        family, _, size = name.partition("-")
        return ChatGLM2Config.tiny(family=family) if size == "tiny" else ChatGLM2Config.full(family)
    return ChatGLMConfig.full() if name == "full" else ChatGLMConfig.tiny()


def compare_quantized(args: argparse.Namespace) -> int:
    """--compare-quantized: decode tokens/s of float, int8 and int4 copies of one model, same run."""
    import torch

    from ..api import load, resolve_device, resolve_dtype
    from ..bench import compare_formats, format_formats, random_model
    from ..errors import ChatGLMError
    from ..quantize import QuantScheme, quantize_model

    if args.random_weights == bool(args.model):
        raise ChatGLMError("pass either --model DIR or --random-weights")
    if args.quantize:
        raise ChatGLMError("--compare-quantized measures float, int8 and int4 itself; drop --quantize")
    if args.rounds < 1:
        raise ChatGLMError("--rounds must be at least 1")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    models = {}
    for bits in (None, 8, 4):
        scheme = None if bits is None else QuantScheme(bits=bits, embeddings=args.quantize_embeddings)
        if args.random_weights:  # the same seed: the same weights in each format
            model = random_model(bench_config(args.config), dtype=dtype, device=device, seed=args.seed)
            model = quantize_model(model, scheme) if scheme else model
        else:
            model, _ = load(args.model, dtype=dtype, device=device, quantize=scheme)
        name = str(dtype).removeprefix("torch.") if bits is None else f"int{bits}" + ("+emb" if args.quantize_embeddings else "")
        models[name] = (model, True)
        if bits and args.reference_path:
            models[f"{name} (dequantize)"] = (model, False)
    from ..options import DecodeOptions

    fast = DecodeOptions(compile=args.compile, prefill_graphs=args.prefill_graphs).validate()
    results = compare_formats(models, new_tokens=args.decode_tokens, rounds=args.rounds, seed=args.seed, fast=fast)
    source = f"random weights, {args.config} config" if args.random_weights else str(args.model)
    if args.json:
        print(json.dumps({"model": source, "device": str(device), "threads": torch.get_num_threads(),
                          "results": [{"mode": r.mode, "weight_bytes": r.weight_bytes, "tokens_per_second": r.rates,
                                       "median": r.median} for r in results]}))
    else:
        print(f"model        {source} on {device}, torch {torch.__version__}")
        print(format_formats(results, threads=torch.get_num_threads()))
    return 0
