"""Tile sweep of the skinny-matmul kernels (kernels.py) on the decode shapes of ChatGLM-6B: float16,
int8 and int4 weights, one token (and a few) per call, against cuBLAS float16.

Each measurement replays a CUDA graph of calls over enough copies of the weight that L2 cannot hold
them (as in decoding, where consecutive calls read different layers), and reports us per call and
TB/s of weight bytes read (scales/zeros included). Kernels are compiled first in parallel worker
processes (Triton's disk cache), then timed one at a time in this process.

    python3 gpu/gemv_sweep.py [--widths 16,8,4] [--quick] [--model chatglm2]   # writes $OUT/gemv_sweep_<model>.json

`swap` tiles put the weight on the dot's left (see swap_configs). Shapes of at most 8192 output rows also time split-K tiles (`split` 2/4: several programs per output tile, each a slice of K).
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from graph_timing import graph_seconds  # noqa: E402  (gpu/, the script's own folder)

SHAPES = {"qkv": (12288, 4096), "dense": (4096, 4096), "h_to_4h": (16384, 4096), "4h_to_h": (4096, 16384),
          "lm_head": (130528, 4096)}
SHAPES_GLM2 = {"qkv": (4608, 4096), "dense": (4096, 4096), "h_to_4h": (27392, 4096), "4h_to_h": (4096, 13696),
               "lm_head": (65024, 4096)}  # ChatGLM2-6B / ChatGLM3-6B (2 key/value groups, SwiGLU of 13696)
MIN_BYTES = 512 << 20  # weight copies per shape: L2 (50 MB) never holds the next call's weight


def configs(width: int, quick: bool) -> list[dict]:
    out = []
    if width in (16, 8):
        for bn, bk, st, w in itertools.product((16, 32, 64), (128, 256, 512), (3, 4, 6), (4, 8)):
            if w == 8 and bn < 64:
                continue
            if quick and (st == 6 or bk == 128):
                continue
            out.append(dict(block_n=bn, block_k=bk, stages=st, num_warps=w, asm=True))
        if width == 8:
            out += [dict(block_n=32, block_k=256, stages=4, num_warps=4, asm=False)]
    else:
        for bn, g, st, w in itertools.product((16, 32, 64), (1, 2, 4), (3, 4, 6), (4, 8)):
            if w == 8 and bn < 64:
                continue
            if quick and st == 6:
                continue
            out.append(dict(block_n=bn, groups=g, stages=st, num_warps=w, asm=True))
        out += [dict(block_n=32, groups=2, stages=4, num_warps=4, asm=False)]
        # the wide tile: a step's groups loaded and multiplied as one
        for bn, g, st, w in itertools.product((16, 32, 64), (2, 4, 8), (3, 4), (4, 8)):
            if w == 8 and bn < 32:
                continue
            out.append(dict(block_n=bn, groups=g, stages=st, num_warps=w, asm=True, wide=True))
    return out + swap_configs(width)


def swap_configs(width: int) -> list[dict]:
    """The weight tile as the dot's left operand (W @ x.T): 64/128 weight rows are the MMA's M, so on Hopper
    Triton may feed wgmma from registers (one warpgroup) rather than staging the converted tile in shared memory."""
    out = []
    for bn, st in itertools.product((64, 128), (3, 4)):
        if width == 4:
            out += [dict(block_n=bn, groups=g, stages=st, num_warps=4, asm=True, swap=True) for g in (1, 2)]
            out += [dict(block_n=bn, groups=g, stages=st, num_warps=4, asm=True, wide=True, swap=True) for g in (2, 4)]
        else:
            out += [dict(block_n=bn, block_k=bk, stages=st, num_warps=4, asm=True, swap=True) for bk in (128, 256)]
    return out


def tall_configs(width: int) -> list[dict]:
    """Tiles for many token rows (a serving step's 64-128 rows, a short prefill): 64 or 128 rows per program, so
    each weight tile is read and converted once for all of them; timed only at --rows above 16."""
    out = []
    plain = [(bn, w, False) for bn, w in itertools.product((32, 64), (4, 8))]
    swapped = [(64, 4, True), (128, 8, True)]  # the weight on the dot's left: 64 of its rows per warpgroup
    for bm, (bn, w, swap) in itertools.product((64, 128), plain + swapped):
        tile = dict(block_m=bm, block_n=bn, stages=3, num_warps=w, asm=True, **(dict(swap=True) if swap else {}))
        out.append(dict(tile, groups=1) if width == 4 else dict(tile, block_k=128))
    return out


def split_configs(width: int) -> list[dict]:
    """Split-K tiles: 2 or 4 programs per output tile, each a slice of K; timed only on shapes of at most
    SPLIT_MAX_N output rows (the 4096-row ones, ChatGLM2/3's 4608-row query_key_value), where one program per
    tile leaves too few in flight (4096 / 32 = 128 programs on 132 SMs)."""
    out = []
    for bn, sp, st in itertools.product((16, 32, 64), (2, 4), (3, 4)):
        if width == 4:
            out.append(dict(block_n=bn, groups=2, stages=st, num_warps=4, asm=True, wide=True, split=sp))
        else:
            out.append(dict(block_n=bn, block_k=256, stages=st, num_warps=4, asm=True, split=sp))
    return out


SPLIT_MAX_N = 8192  # shapes with at most this many output rows also time split_configs


def make_weight(width: int, n: int, k: int, device="cuda"):
    from chatglm_ft.quantize import quantize_int4, quantize_int8

    w = torch.randn(n, k, device=device) / k**0.5
    if width == 16:
        return (w.half(), None, None)
    if width == 8:
        q, s = quantize_int8(w)
        return (q, s, None)
    return quantize_int4(w, 128)


def weight_bytes(parts) -> int:
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def call(width: int, x, parts, cfg):
    from chatglm_ft import kernels

    w, s, z = parts
    return kernels.skinny_matmul(x, w, s, z, None, kernels.GemvConfig(**cfg) if cfg else None)


def compile_worker(jobs: list[tuple[int, int, dict]]) -> list[str]:
    """Compile (run once on a small weight with the same K) every (width, K, config): Triton caches on disk."""
    errors = []
    for width, k, cfg in jobs:
        try:
            parts = make_weight(width, 64, k)
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            call(width, x, parts, cfg)
            torch.cuda.synchronize()
        except Exception as e:  # reported by the timing pass too
            errors.append(f"{width} {k} {cfg}: {type(e).__name__}: {str(e)[:300]}")
    return errors


def graph_time(fn_list, repeats: int = 5) -> float:
    """Mean us per call of the functions in fn_list, replayed from one CUDA graph."""
    return graph_seconds(fn_list, repeats) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="16,8,4")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--rows", default="1,4,16", help="token rows for the best configs")
    ap.add_argument("--model", choices=["chatglm", "chatglm2"], default="chatglm",
                    help="the decode shapes of ChatGLM-6B or of ChatGLM2-6B/ChatGLM3-6B")
    args = ap.parse_args()
    shapes = SHAPES_GLM2 if args.model == "chatglm2" else SHAPES
    widths = [int(w) for w in args.widths.split(",")]
    began = time.perf_counter()
    result: dict = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "widths": {}, "errors": []}

    jobs = [(w, k, c) for w in widths for k in sorted({k for _, k in shapes.values()}) for c in configs(w, args.quick)]
    jobs += [(w, k, c) for w in widths for k in sorted({k for n, k in shapes.values() if n <= SPLIT_MAX_N})
             for c in split_configs(w)]
    if any(int(r) > 16 for r in args.rows.split(",")):
        jobs += [(w, k, c) for w in widths for k in sorted({k for _, k in shapes.values()}) for c in tall_configs(w)]
    chunks = [jobs[i::args.workers] for i in range(args.workers)]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for errs in pool.map(compile_worker, chunks):
            result["errors"] += errs
    result["compile_s"] = round(time.perf_counter() - began, 1)
    print(f"compiled {len(jobs)} kernels in {result['compile_s']} s; {len(result['errors'])} errors", flush=True)
    for e in result["errors"][:10]:
        print("  ", e, flush=True)

    torch.manual_seed(0)
    for width in widths:
        table = {}
        for name, (n, k) in shapes.items():
            if name == "lm_head" and width == 4:
                continue
            base = make_weight(width, n, k)
            nbytes = weight_bytes(base)
            copies = [base] + [tuple(t.clone() if t is not None else None for t in base)
                               for _ in range(max(1, -(-MIN_BYTES // nbytes)) - 1)]
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            if width == 16:
                ref = x.double() @ base[0].double().T
            else:
                from chatglm_ft.quantize import dequantize_reference
                ref = x.double() @ dequantize_reference(*base, torch.float64).T
            rows = {}
            if width == 16:
                us = graph_time([lambda p=p: F.linear(x, p[0]) for p in copies])
                rows["cublas"] = {"us": round(us, 2), "tb_s": round(nbytes / us / 1e6, 3)}
            for cfg in configs(width, args.quick) + (split_configs(width) if n <= SPLIT_MAX_N else []):
                key = json.dumps(cfg, sort_keys=True)
                try:
                    y = call(width, x, base, cfg)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    us = graph_time([lambda p=p, c=cfg: call(width, x, p, c) for p in copies])
                    rows[key] = {"us": round(us, 2), "tb_s": round(nbytes / us / 1e6, 3), "rel_err": err}
                except Exception as e:
                    rows[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            ok = {c: r for c, r in rows.items() if "us" in r and r.get("rel_err", 0) < 5e-3}
            best = sorted(ok, key=lambda c: ok[c]["us"])[:5]
            table[name] = {"n": n, "k": k, "bytes": nbytes, "copies": len(copies), "best": best,
                           "rows": rows}
            line = ", ".join(f"{c} {ok[c]['us']}us {ok[c]['tb_s']}TB/s" for c in best[:3])
            print(f"w{width} {name:8} cublas={rows.get('cublas', {}).get('tb_s', '-')} best: {line}", flush=True)
            # more token rows with the best config
            if best and best[0] != "cublas":
                cfg = json.loads(best[0])
                for m in [int(r) for r in args.rows.split(",") if int(r) > 1]:
                    xm = torch.randn(m, k, device="cuda", dtype=torch.float16)
                    us = graph_time([lambda p=p, c=cfg: call(width, xm, p, c) for p in copies])
                    table[name][f"rows_{m}_us"] = round(us, 2)
                    if m > 16:  # the tall tiles: best of them at this row count
                        tall = {}
                        for tc in tall_configs(width):
                            try:
                                yt = call(width, xm, base, tc)
                                ref_m = call(width, xm, base, cfg)
                                if ((yt.float() - ref_m.float()).norm() / ref_m.float().norm()).item() > 5e-3:
                                    continue
                                tall[json.dumps(tc, sort_keys=True)] = round(graph_time(
                                    [lambda p=p, c=tc: call(width, xm, p, c) for p in copies]), 2)
                            except Exception as e:  # noqa: BLE001  (a tile that does not fit: skipped)
                                result["errors"].append(f"tall {width} {name} {tc}: {type(e).__name__}: {str(e)[:120]}")
                        if tall:
                            best_tall = min(tall, key=tall.get)
                            table[name][f"rows_{m}_tall_us"] = tall[best_tall]
                            table[name][f"rows_{m}_tall_config"] = best_tall
                    if width == 16:
                        table[name][f"rows_{m}_cublas_us"] = round(graph_time([lambda p=p: F.linear(xm, p[0]) for p in copies]), 2)
                    else:
                        from chatglm_ft import kernels
                        table[name][f"rows_{m}_dequant_cublas_us"] = round(graph_time(
                            [lambda p=p: F.linear(xm, kernels.dequantize(p[0], p[1], p[2], torch.float16)) for p in copies]), 2)
            many = {k: v for k, v in table[name].items() if k.startswith("rows_") and not k.endswith("config")}
            if many:
                print(f"w{width} {name:8} rows: {many}", flush=True)
            del copies, base
            torch.cuda.empty_cache()
        result["widths"][str(width)] = table
    # whole-token totals of the best per shape (28 layers + lm_head)
    for width, table in result["widths"].items():
        per_layer = sum(table[s]["rows"][table[s]["best"][0]]["us"] for s in ("qkv", "dense", "h_to_4h", "4h_to_h")
                        if s in table and table[s]["best"])
        result.setdefault("token_us", {})[width] = round(28 * per_layer, 1)
    result["seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(result.get("token_us"), indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"gemv_sweep_{args.model}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
