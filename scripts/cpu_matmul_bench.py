"""One decode-step matmul (1 token row) on the CPU: float32 BLAS against int8/int4 through the
dequantizing path and through cpu_quant's kernels (int8-rounded input, the default, and float input),
and against the float16 kernel (the lm_head of a quantized CPU model), for the linear layers of a model shape.

    PYTHONPATH=src python3 scripts/cpu_matmul_bench.py --shape mid --reps 7 [--threads N]

Each repetition times every variant once, in turn (interleaved), so a change in the machine's load
touches all alike; the table gives the median ms per call and the effective GB/s of weight bytes read.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from chatglm_ft import cpu_quant
from chatglm_ft.quantize import blocked_linear, quantize_int4, quantize_int8

SHAPES = {  # (out, in) of the decode matmuls of one layer (+ lm_head for mid)
    "mid": [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096), (130528, 1024)],
    "full": [(12288, 4096), (4096, 4096), (16384, 4096), (4096, 16384)],
}


def float_input(fn, *args):
    with cpu_quant.int8_activations(False):
        return fn(*args)


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reference-path", action="store_true", help="also time the dequantizing path (slow)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assert cpu_quant.available()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.reps} interleaved repetitions")
    print(f"{'out x in':>14} {'variant':<16} {'ms median':>10} {'(min-max)':>16} {'GB/s':>6} {'vs f32':>7}")
    for n, k in SHAPES[args.shape]:
        w = torch.randn(n, k) * 0.02
        x = torch.randn(1, k)
        q8, q4, w16 = quantize_int8(w), quantize_int4(w, 128), w.half()
        variants = {
            "float32": (lambda: F.linear(x, w), w.numel() * 4),
            "int8 kernel": (lambda: cpu_quant.linear(x, *q8, None, None), q8[0].numel() + q8[1].numel() * 2),
            "int4 kernel": (lambda: cpu_quant.linear(x, *q4, None), q4[0].numel() + q4[1].numel() * 3),
            "int8 float-in": (lambda: float_input(cpu_quant.linear, x, *q8, None, None), q8[0].numel() + q8[1].numel() * 2),
            "int4 float-in": (lambda: float_input(cpu_quant.linear, x, *q4, None), q4[0].numel() + q4[1].numel() * 3),
            "float16 kernel": (lambda: cpu_quant.half_linear(x, w16, None), w16.numel() * 2),
        }
        if args.reference_path:
            variants["int8 dequantize"] = (lambda: blocked_linear(x, *q8, None, None), variants["int8 kernel"][1])
            variants["int4 dequantize"] = (lambda: blocked_linear(x, *q4, None), variants["int4 kernel"][1])
        times = {name: [] for name in variants}
        for fn, _ in variants.values():
            fn()  # warm-up
        for _ in range(args.reps):
            for name, (fn, _) in variants.items():
                times[name].append(timed(fn))
        base = statistics.median(times["float32"])
        for name, (_, nbytes) in variants.items():
            t = statistics.median(times[name])
            print(f"{n:>7}x{k:<6} {name:<16} {t * 1e3:10.2f} {min(times[name]) * 1e3:7.2f}-{max(times[name]) * 1e3:<8.2f}"
                  f" {nbytes / t / 1e9:6.1f} {base / t:6.2f}x")


if __name__ == "__main__":
    main()
