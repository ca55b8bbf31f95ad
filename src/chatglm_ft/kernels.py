"""Triton kernels: the skinny matmul that decoding's one-token (up to 16-token) matmuls run on CUDA,
for float16/bfloat16, int8 and int4 weights, and the dequantize kernel (CPU only under TRITON_INTERPRET=1).

Batch-1 decoding reads every weight once per token, so its speed is set by bytes read. The skinny
matmul streams the weight tiles through `tl.dot` (tensor cores, token rows padded to 16), which lets
Triton's pipeliner keep several tiles per program in flight: float16 weights stream at 3.0-4.5 TB/s
on an H200 (cuBLAS one-row GEMMs: 2.5-4.0). Integer weights are unpacked in registers with packed
PTX conversions (`_int8_to_f16`, `_nibbles_to_f16`: a cvt per value runs at a fraction of the FMA
rate) and never written out as float16. Multi-token inputs (prefill, training) instead dequantize a
layer's weight to float16 with `dequantize` and let cuBLAS do the matmul.

K is a compile-time constant (the model has two: 4096 and 16384): fixed trip counts and known
alignment. Tile sizes are fixed per shape (`gemv_config`, from gpu/gemv_sweep.py), not autotuned,
so results are reproducible. The entry points are torch custom ops (`torch.ops.chatglm_ft.*`):
torch.compile traces through them and CUDA graphs capture them (no host sync inside).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# Token rows per call up to which the skinny matmul costs what one row does (gpu/gemv_sweep.py: 1, 4 and
# 16 rows take the same time, 4-5x less than dequantize + cuBLAS for int8/int4, below cuBLAS for float16).
MAX_ROWS = 16


@dataclass(frozen=True)
class GemvConfig:
    """Tiles of the skinny-matmul kernels: BLOCK_M token rows (padded: tl.dot needs 16) x BLOCK_N output
    rows per program, BLOCK_K input columns (int4: groups of GROUP columns, `groups` of them) per
    pipelined loop step, `stages` loads in flight."""

    block_n: int = 32
    block_k: int = 256  # float16/int8 only
    groups: int = 2  # int4 only: groups per loop step
    stages: int = 4
    num_warps: int = 4
    asm: bool = True  # packed PTX integer -> float16 conversion (off in the CPU interpreter)
    block_m: int = 16
    wide: bool = False  # int4 only: the step's groups as one wide tile (two long tl.dot) instead of one by one
    split: int = 1  # K split over this many programs per output tile (split-K), summed by the tile's last one
    swap: bool = False  # the weight tile as tl.dot's left operand (W @ x.T): its rows are the MMA's M (on Hopper
    # the operand wgmma may take from registers). For gemv_sweep.py only: on an H100 it lost on every ChatGLM-6B int4
    # decode shape (docs/benchmarks.md, 2026-12-07 (d)); its tall tiles for serving rows are not measured yet


# Shapes where the rules in gemv_config lose, each the fastest of `gpu/gemv_sweep.py --quick` on an H100:
# - ChatGLM2/3-6B's own shapes (query_key_value 4608 x 4096, dense_h_to_4h 27392 x 4096, dense_4h_to_h
#   4096 x 13696; 2026-12-07, docs/results/2026-12-07b-h100/gemv_sweep_chatglm2.json; us per call against the
#   rules' tiles: int4 33.9 vs 46.6 and 33.6 vs 41.8 for the two FFN matmuls, 11.4 vs 12.5 for query_key_value;
#   float16 query_key_value 15.6 vs 18.9; int8 query_key_value 10.7 vs 11.7, dense_h_to_4h 42.1 vs 43.2).
# - ChatGLM-6B's int4 layers (docs/results/2026-12-07c-h100/gemv_sweep_chatglm.json: query_key_value 16.6 vs
#   21.4 us, dense 9.0 vs 9.5, dense_h_to_4h 19.9 vs 20.8, dense_4h_to_h 23.2 vs 34.4 with split-K: a 4096-row
#   output has only 128 tiles of 32 rows for the H100's 132 SMs, so four programs share each tile's K). Batch-1
#   int4 decode 318 -> 367 tokens/s in the same run. Its float16 and int8 layers keep the H200-tuned rules (the
#   sweep's picks changed the int8 model's decode by under 1%).
SHAPE_CONFIGS: dict[tuple[int, int, int], GemvConfig] = {
    (16, 4608, 4096): GemvConfig(block_n=64, block_k=256, stages=3),
    (8, 4608, 4096): GemvConfig(block_n=64, block_k=512, stages=3),
    (8, 27392, 4096): GemvConfig(block_n=64, block_k=512, stages=3),
    (4, 4608, 4096): GemvConfig(block_n=64, groups=4, stages=3, wide=True),
    (4, 27392, 4096): GemvConfig(block_n=32, groups=2, stages=3, wide=True),
    (4, 4096, 13696): GemvConfig(block_n=32, groups=8, stages=3, wide=True),
    (4, 12288, 4096): GemvConfig(block_n=32, groups=2, stages=3, wide=True),
    (4, 4096, 4096): GemvConfig(block_n=32, groups=2, stages=3, wide=True, split=2),
    (4, 16384, 4096): GemvConfig(block_n=64, groups=2, stages=3, wide=True),
    (4, 4096, 16384): GemvConfig(block_n=64, groups=2, stages=3, wide=True, split=4),
}


def gemv_config(bits: int, n: int, k: int) -> GemvConfig:
    """Tile sizes per weight width and shape: the fastest of gpu/gemv_sweep.py on an H200 for the
    model's shapes (wide outputs take 64-row tiles, the 4096-row ones longer K steps).
    `configure(gemv_configs=...)` names a sweep result (JSON) to use instead, for tuning on another GPU
    (the CLI passes $CHATGLM_FT_GEMV_CONFIGS)."""
    tuned = _tuned_configs().get((bits, n, k)) or SHAPE_CONFIGS.get((bits, n, k))
    if tuned is not None:
        return tuned
    if bits == 4:
        return GemvConfig(block_n=64, groups=2, stages=3) if n >= 16384 else GemvConfig(block_n=32, groups=4, stages=3)
    if n >= 16384:
        return GemvConfig(block_n=64, block_k=128 if bits == 16 else 256, stages=4 if bits == 16 else 3)
    if n >= 8192:
        return GemvConfig(block_n=32, block_k=128 if bits == 16 else 256, stages=4)
    return GemvConfig(block_n=32, block_k=512, stages=4)


def tall_config(bits: int, n: int, k: int, rows: int) -> GemvConfig:
    """Tiles for more than 32 token rows (a serving step, a short prefill: KernelOptions.float_rows /
    quantized_rows above 16): 64 or 128 rows a program, so each weight tile is loaded and converted once
    for all of them (with 16-row tiles 8 programs each read it from L2 and convert it again)."""
    block_m = 64 if rows <= 64 else 128
    if bits == 4:
        return GemvConfig(block_m=block_m, block_n=64, groups=1, stages=3, num_warps=8)
    return GemvConfig(block_m=block_m, block_n=64, block_k=128, stages=3, num_warps=8)


# How these kernels launch, for A/B measurements and tuning only: set once by the CLI layer
# (commands/options.py, from $CHATGLM_FT_PDL and $CHATGLM_FT_GEMV_CONFIGS) through `configure`.
LAUNCH: dict = {"pdl": True, "gemv_configs": None}


def configure(*, pdl: bool | None = None, gemv_configs: str | None = None) -> None:
    """Turn programmatic dependent launch off (`pdl=False`) or use a gemv_sweep.py result's tile sizes."""
    if pdl is not None:
        LAUNCH["pdl"] = pdl
        pdl_supported.cache_clear()
    if gemv_configs is not None:
        LAUNCH["gemv_configs"] = gemv_configs
        _tuned_configs.cache_clear()


@functools.cache
def _tuned_configs() -> dict:
    """{(bits, n, k): GemvConfig} from the configured sweep result (gpu/gemv_sweep.py's `best` entries)."""
    tuned = {}
    path = LAUNCH["gemv_configs"]
    if path and os.path.exists(path):
        sweep = json.loads(open(path).read())
        for bits, table in sweep.get("widths", {}).items():
            for entry in table.values():
                best = [c for c in entry.get("best", []) if c != "cublas"]
                if best:
                    tuned[(int(bits), entry["n"], entry["k"])] = GemvConfig(**json.loads(best[0]))
    return tuned


# -- integer -> float16 conversions --------------------------------------------------------------
# Four int8 (or 8 int4) values per 32-bit register become float16 pairs with byte permutes and
# bitwise ops: `0x64XY` read as float16 is 1024 + 0xXY, so one subtraction (one fused multiply-add
# for a high nibble) per two values gives the exact integer. A cvt per value would cap the kernels
# well below memory bandwidth (int4: ~30 values per clock per SM at 4 TB/s).
@triton.jit
def _int8_to_f16(w):
    """int8 tensor -> float16 tensor with the same values (exact)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, c;
        xor.b32 t, $2, 0x80808080;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, t, 0x64646464, 0x5140;
        prmt.b32 $1, t, 0x64646464, 0x7362;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""",
        constraints="=r,=r,r", args=[w], dtype=tl.float16, is_pure=True, pack=4,
    )


@triton.jit
def _nibbles_to_f16(w):
    """uint8 tensor -> (low nibble, high nibble) as float16 tensors (exact values 0..15)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t0, t1, c, s, o;
        mov.b32 c, 0x64006400;
        mov.b32 s, 0x2C002C00;
        mov.b32 o, 0xD400D400;
        prmt.b32 t0, $4, 0x64646464, 0x5140;
        prmt.b32 t1, $4, 0x64646464, 0x7362;
        and.b32 $0, t0, 0xFF0FFF0F;
        and.b32 $1, t1, 0xFF0FFF0F;
        and.b32 $2, t0, 0xFFF0FFF0;
        and.b32 $3, t1, 0xFFF0FFF0;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        fma.rn.f16x2 $2, $2, s, o;
        fma.rn.f16x2 $3, $3, s, o;
        }""",
        constraints="=r,=r,=r,=r,r", args=[w], dtype=(tl.float16, tl.float16), is_pure=True, pack=4,
    )


# -- skinny matmul kernels: y (M, N) = x (M, K) @ W.T for M <= a few tokens ----------------------
# Weights stream through tl.dot (tensor cores; the token rows padded to BLOCK_M), so Triton's
# pipeliner keeps `stages` tiles of every program in flight: what a memory-bound GEMV needs.
@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K: tl.constexpr,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUPS: tl.constexpr, STAGES: tl.constexpr,
    PRECISION: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr, WIDE: tl.constexpr = False,
    SPLIT: tl.constexpr = 1, part_ptr=None, count_ptr=None, SWAP: tl.constexpr = False,
):
    """BITS 16: w float (N, K). BITS 8: w int8 (N, K), scale (N,). BITS 4: w uint8 (N, K/2) packed by
    group halves (quantize.pack_int4), scale float16 / zero uint8 (N, K/GROUP).
    SPLIT > 1 (split-K): program_id(2) takes one of SPLIT slices of K and writes its float32 partial tile to
    part_ptr (SPLIT, M, N); the tile's last program (an int32 counter per tile in count_ptr, zero before and
    after) adds them up, applies the epilogue and stores y. More programs stream a 4096-row weight at once."""
    # token-row tiles vary fastest: the programs of one weight tile run side by side, so with more than BLOCK_M
    # rows the weight tile comes from HBM once and from L2 for the other row tiles
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rows_m < M
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows_n < N
    rows_n64 = rows_n.to(tl.int64)
    if PDL:  # launched early (programmatic dependent launch): wait for the kernel that writes x, let the next one launch
        gdc_wait()
        gdc_launch_dependents()
    pid_k = tl.program_id(2)
    if SWAP:  # accumulated as (BLOCK_N, BLOCK_M), transposed once after the loop
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_rows = x_ptr + rows_m[:, None] * K
    dt = x_ptr.dtype.element_ty
    if BITS == 4 and WIDE:
        # GROUPS consecutive groups as one (BLOCK_N, GROUPS * GROUP/2)-byte tile: one wide load and two
        # long tl.dot per step (low and high nibbles) instead of GROUPS narrow ones; the scales and zero
        # points broadcast over each group's columns through a (BLOCK_N, GROUPS, GROUP/2) view.
        HALF: tl.constexpr = GROUP // 2
        NG: tl.constexpr = K // GROUP
        W: tl.constexpr = GROUPS * HALF
        c = tl.arange(0, W)
        gi = tl.arange(0, GROUPS)
        x_col = (c // HALF) * GROUP + c % HALF  # x column of each low nibble's byte within a step
        w_rows = w_ptr + rows_n64[:, None] * (K // 2) + c[None, :]
        md = tl.float16 if dt == tl.float16 else tl.float32
        STEPS: tl.constexpr = (NG + GROUPS - 1) // GROUPS
        k_first, k_end = _k_slice(pid_k, STEPS, 1, SPLIT)  # not lo/hi: those name the nibbles below (a loop-carried clash)
        for step in tl.range(k_first, k_end, num_stages=STAGES):
            g0 = step * GROUPS
            if NG % GROUPS == 0:
                w_ok = n_ok[:, None]
                meta_ok = n_ok[:, None]
                x_ok = m_ok[:, None]
            else:  # the last step passes the end (ChatGLM2/3's 13696 = 107 groups of 128): masked, no traffic
                w_ok = n_ok[:, None] & (g0 + c[None, :] // HALF < NG)
                meta_ok = n_ok[:, None] & (g0 + gi[None, :] < NG)
                x_ok = m_ok[:, None] & (g0 + c[None, :] // HALF < NG)
            wb = tl.load(w_rows + g0 * HALF, mask=w_ok, other=0, eviction_policy="evict_first")
            if ASM:
                lo, hi = _nibbles_to_f16(wb)
            else:
                lo = (wb & 0xF).to(tl.float16)
                hi = (wb >> 4).to(tl.float16)
            meta = rows_n64[:, None] * NG + g0 + gi[None, :]
            sc = tl.load(scale_ptr + meta, mask=meta_ok, other=0).to(md)[:, :, None]
            zp = tl.load(zero_ptr + meta, mask=meta_ok, other=0).to(md)[:, :, None]
            w_lo = tl.reshape((tl.reshape(lo.to(md), (BLOCK_N, GROUPS, HALF)) - zp) * sc, (BLOCK_N, W)).to(dt)
            w_hi = tl.reshape((tl.reshape(hi.to(md), (BLOCK_N, GROUPS, HALF)) - zp) * sc, (BLOCK_N, W)).to(dt)
            x_lo = tl.load(x_rows + g0 * GROUP + x_col[None, :], mask=x_ok, other=0)
            x_hi = tl.load(x_rows + g0 * GROUP + HALF + x_col[None, :], mask=x_ok, other=0)
            acc = _mma(acc, x_lo, w_lo, SWAP, PRECISION)
            acc = _mma(acc, x_hi, w_hi, SWAP, PRECISION)
    elif BITS == 4:
        HALF: tl.constexpr = GROUP // 2
        NG: tl.constexpr = K // GROUP
        j = tl.arange(0, HALF)
        w_rows = w_ptr + rows_n64[:, None] * (K // 2) + j[None, :]
        STEPS: tl.constexpr = (NG + GROUPS - 1) // GROUPS
        k_first, k_end = _k_slice(pid_k, STEPS, 1, SPLIT)
        for step in tl.range(k_first, k_end, num_stages=STAGES):
            for gi in tl.static_range(GROUPS):
                g = step * GROUPS + gi
                if NG % GROUPS == 0:
                    meta_ok = n_ok
                    x_ok = m_ok[:, None]
                else:  # the last step passes the end (ChatGLM2/3's 13696 = 107 groups of 128): masked, no traffic
                    meta_ok = n_ok & ((rows_n * 0 + g) < NG)
                    x_ok = m_ok[:, None] & ((rows_m * 0 + g) < NG)[:, None]
                wb = tl.load(w_rows + g * HALF, mask=meta_ok[:, None], other=0, eviction_policy="evict_first")
                if ASM:
                    lo, hi = _nibbles_to_f16(wb)
                else:
                    lo = (wb & 0xF).to(tl.float16)
                    hi = (wb >> 4).to(tl.float16)
                meta = rows_n64 * NG + g
                # (q - zero) is exact and the product rounds once: bit-identical to `dequantize` in x's dtype
                # (float16 math for float16 x; float32 math, then rounding, for bfloat16/float32 x)
                md = tl.float16 if dt == tl.float16 else tl.float32
                sc = tl.load(scale_ptr + meta, mask=meta_ok, other=0).to(md)[:, None]
                zp = tl.load(zero_ptr + meta, mask=meta_ok, other=0).to(md)[:, None]
                w_lo = ((lo.to(md) - zp) * sc).to(dt)
                w_hi = ((hi.to(md) - zp) * sc).to(dt)
                x_lo = tl.load(x_rows + g * GROUP + j[None, :], mask=x_ok, other=0)
                x_hi = tl.load(x_rows + g * GROUP + HALF + j[None, :], mask=x_ok, other=0)
                acc = _mma(acc, x_lo, w_lo, SWAP, PRECISION)
                acc = _mma(acc, x_hi, w_hi, SWAP, PRECISION)
    else:
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows_n64[:, None] * K + cols[None, :]
        k_first, k_end = _k_slice(pid_k, K, BLOCK_K, SPLIT)
        for k in tl.range(k_first, k_end, BLOCK_K, num_stages=STAGES):
            if K % BLOCK_K == 0:
                w_ok = n_ok[:, None]
                x_ok = m_ok[:, None]
            else:  # K not a multiple of the tile (ChatGLM2/3's 13696): the last step is masked
                w_ok = n_ok[:, None] & (k + cols[None, :] < K)
                x_ok = m_ok[:, None] & (k + cols[None, :] < K)
            w = tl.load(w_rows + k, mask=w_ok, other=0, eviction_policy="evict_first")
            if BITS == 8:
                if ASM:
                    w = _int8_to_f16(w)
                w = w.to(dt)
            x = tl.load(x_rows + k + cols[None, :], mask=x_ok, other=0)
            acc = _mma(acc, x, w, SWAP, PRECISION)
    if SWAP:
        acc = tl.trans(acc)
    if BITS == 8:
        acc *= tl.load(scale_ptr + rows_n, mask=n_ok, other=0).to(tl.float32)[None, :]
    write = m_ok[:, None] & n_ok[None, :]
    if SPLIT > 1:
        part = part_ptr + rows_m[:, None] * N + rows_n[None, :]
        tl.store(part + pid_k * M * N, acc, mask=write)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        tile = count_ptr + pid_m * tl.num_programs(1) + pid_n
        done = tl.atomic_add(tile, 1, sem="acq_rel")  # slices of this tile finished before this one
        last = done == SPLIT - 1
        # only the last one sums and stores (compared as a tile: Triton's CPU interpreter rejects a scalar mask in `&`)
        write = write & (done + tl.zeros_like(rows_m)[:, None] == SPLIT - 1)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in tl.static_range(SPLIT):  # in slice order: the sum does not depend on which program came last
            acc += tl.load(part + s * M * N, mask=write, other=0, cache_modifier=".cg")
        tl.atomic_xchg(tile, 0, mask=last)  # zero again for the next call
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=n_ok, other=0).to(tl.float32)[None, :]
    if ACT == 1:  # GELU, tanh approximation: 0.5 * (1 + tanh(z)) = sigmoid(2z)
        acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
    out = y_ptr + rows_m[:, None] * N + rows_n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=write)


@triton.jit
def _mma(acc, x, w, SWAP: tl.constexpr, PRECISION: tl.constexpr):
    """acc + x @ w.T (acc (BLOCK_M, BLOCK_N)), or with SWAP acc + w @ x.T (acc (BLOCK_N, BLOCK_M))."""
    if SWAP:
        return tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
    else:
        return tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)


@triton.jit
def _k_slice(pid_k, total: tl.constexpr, step: tl.constexpr, SPLIT: tl.constexpr):
    """[lo, hi) of the K loop for slice pid_k of SPLIT (whole steps each); the whole loop when SPLIT is 1."""
    if SPLIT == 1:
        return 0, total
    else:
        per: tl.constexpr = ((total + step - 1) // step + SPLIT - 1) // SPLIT * step
        return pid_k * per, tl.minimum(total, pid_k * per + per)



@triton.jit
def _dequantize_kernel(
    w_ptr, scale_ptr, zero_ptr, out_ptr, N, K,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out (N, K) = dequantized weight, computed in float32 (bit-identical to the PyTorch reference)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rows[:, None] < N) & (cols[None, :] < K)
    rows64 = rows[:, None].to(tl.int64)
    if BITS == 8:
        q = tl.load(w_ptr + rows64 * K + cols[None, :], mask=ok, other=0).to(tl.float32)
        w = q * tl.load(scale_ptr + rows, mask=rows < N, other=0).to(tl.float32)[:, None]
    else:
        # group halves: column g*GROUP + j sits in byte g*GROUP/2 + j % (GROUP/2), high nibble for the second half
        half = cols[None, :] % GROUP
        byte_col = (cols[None, :] // GROUP) * (GROUP // 2) + half % (GROUP // 2)
        byte = tl.load(w_ptr + rows64 * (K // 2) + byte_col, mask=ok, other=0).to(tl.int32)
        q = tl.where(half < GROUP // 2, byte & 0xF, byte >> 4).to(tl.float32)
        meta = rows64 * (K // GROUP) + cols[None, :] // GROUP
        zero = tl.load(zero_ptr + meta, mask=ok, other=0).to(tl.float32)
        scale = tl.load(scale_ptr + meta, mask=ok, other=0).to(tl.float32)
        w = (q - zero) * scale
    tl.store(out_ptr + rows64 * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequantize_int4_kernel(
    w_ptr, scale_ptr, zero_ptr, out_ptr, N, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out (N, K) = the dequantized int4 weight, for power-of-two groups: a program takes BLOCK_K // GROUP
    whole groups of BLOCK_N rows. Their packed bytes are one contiguous tile (byte j of a group holds
    column j in its low nibble and column j + GROUP/2 in its high one), so the load is one wide read and
    each nibble half stores as contiguous runs; no byte is read twice. Computed in float32, as
    `_dequantize_kernel` and the PyTorch reference (bit-identical)."""
    HALF: tl.constexpr = GROUP // 2
    NG: tl.constexpr = K // GROUP
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_K // 2)  # the program's bytes within a row
    g = tl.program_id(1) * (BLOCK_K // GROUP) + c // HALF  # the group of each byte
    ok = (rows[:, None] < N) & (g[None, :] < NG)  # K need not be a multiple of BLOCK_K (13696 = 107 groups)
    rows64 = rows[:, None].to(tl.int64)
    byte = tl.load(w_ptr + rows64 * (K // 2) + tl.program_id(1) * (BLOCK_K // 2) + c[None, :], mask=ok, other=0)
    meta = rows64 * NG + g[None, :]
    zero = tl.load(zero_ptr + meta, mask=ok, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + meta, mask=ok, other=0).to(tl.float32)
    low = out_ptr + rows64 * K + g[None, :] * GROUP + (c % HALF)[None, :]
    tl.store(low, (((byte & 0xF).to(tl.float32) - zero) * scale).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(low + HALF, (((byte >> 4).to(tl.float32) - zero) * scale).to(out_ptr.dtype.element_ty), mask=ok)


# -- launchers (plain functions: also usable on CPU tensors under TRITON_INTERPRET=1) -----------
@functools.cache
def pdl_supported(index: int) -> bool:
    """Programmatic dependent launch (Hopper and later): a kernel's blocks start while the previous
    kernel drains and wait in-kernel (`gdc_wait`) for its results, hiding the launch latency between
    the ~300 small kernels of a decode step. Off with configure(pdl=False) ($CHATGLM_FT_PDL=0 in the CLI)."""
    if not LAUNCH["pdl"]:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    return t.is_cuda and pdl_supported(t.device.index if t.device.index is not None else torch.cuda.current_device())


def gemv_supported(weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """Whether the kernels take this weight (the real model's and the tiny test model's shapes do).
    Plain integer logic on shapes, so torch.compile traces it without a graph break."""
    if weight.dtype != torch.uint8:  # float or int8: K steps are powers of two >= 16 (tl.dot's minimum)
        k = weight.shape[1]
        return k >= 16 and k % 16 == 0
    k = weight.shape[1] * 2
    group = k // scale.shape[1]
    return 32 <= group and group & (group - 1) == 0


def device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a model on cuda:1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _block_k(k: int, block_k: int) -> int:
    """The tile's K step: block_k, but no longer than K needs (a power of two >= 16). K need not be a
    multiple: the kernel masks the last step (a smaller divisor of 13696, ChatGLM2/3's FFN width, would
    be 128 columns per step: too few bytes in flight to stream the weight)."""
    return max(16, min(block_k, triton.next_power_of_2(k)))


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, config: GemvConfig | None = None, act: int = 0) -> torch.Tensor:
    """y (M, N) = x (M, K) @ W.T + bias for a float16/bfloat16/float32 (N, K), int8 (N, K) + scale or
    int4 (N, K/2) + scale/zero weight; in x's dtype. Meant for M up to a few tokens (decoding).
    act=1 applies GELU (tanh approximation) to the result in float32 before rounding."""
    M, K = x.shape
    N = weight.shape[0]
    bits = 4 if weight.dtype == torch.uint8 else 8 if weight.dtype == torch.int8 else 16
    config = config or (tall_config(bits, N, K, M) if M > 2 * MAX_ROWS else gemv_config(bits, N, K))
    group = K // scale.shape[1] if bits == 4 else K
    groups = max(1, min(config.groups, K // group))  # the kernel masks a last step past K // group
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n), config.split)
    split = {}
    if config.split > 1:
        split = dict(SPLIT=config.split, part_ptr=torch.empty(config.split, M, N, dtype=torch.float32, device=x.device),
                     count_ptr=tile_counters(x.device, grid[0] * grid[1], _stream_of(x)))
    pdl = use_pdl(x)
    with device_of(x):
        _gemv_kernel[grid](
            x.contiguous(), weight, scale if scale is not None else weight, zero if zero is not None else weight,
            bias if bias is not None else weight, y, M, N, K,
            BITS=bits, GROUP=group, HAS_BIAS=bias is not None, ASM=config.asm and x.is_cuda,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=_block_k(K, config.block_k), GROUPS=groups,
            STAGES=config.stages, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", ACT=act,
            PDL=pdl, WIDE=config.wide and bits == 4, SWAP=config.swap, num_warps=config.num_warps, launch_pdl=pdl, **split,
        )
    return y


def _stream_of(x: torch.Tensor) -> int:
    """The raw handle of the stream x's kernels go to now (under capture: the capturing stream); 0 off CUDA."""
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0


_COUNTERS: dict[tuple[torch.device, int], list[torch.Tensor]] = {}


def tile_counters(device: torch.device, tiles: int, stream: int = 0) -> torch.Tensor:
    """Split-K's per-tile counters: a zeroed int32 buffer per device and stream, the newest of its list (the
    kernel leaves every counter at zero, so the buffer is reused without a memset: calls on one stream run one
    after another). Streams need their own: the server's background compile runs split-K matmuls on its stream
    while the worker's graphs run theirs, and two kernels counting in one buffer can leave a tile unsummed and a
    counter off zero for every later call. A graph uses the buffer of the stream it was captured on; each
    decoder captures on a stream of its own. Made on the first eager call, before a CUDA graph captures the
    same shapes. A call that needs more tiles gets a larger buffer; the smaller ones stay referenced, because
    graphs captured with them still use them."""
    buffers = _COUNTERS.setdefault((device, stream), [])
    if not buffers or buffers[-1].numel() < tiles:
        buffers.append(torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device))
    return buffers[-1]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The float (N, K) weight of an int8 (zero None) or int4 layer."""
    N = weight.shape[0]
    bits = 8 if zero is None else 4
    K = weight.shape[1] * (8 // bits)
    group = K if zero is None else K // scale.shape[1]
    out = torch.empty(N, K, dtype=dtype, device=weight.device)
    if bits == 4 and group >= 2 and group & (group - 1) == 0:  # whole groups per program: contiguous tiles
        block_n, block_k = 16, max(group, min(512, triton.next_power_of_2(K)))
        with device_of(weight):
            _dequantize_int4_kernel[(triton.cdiv(N, block_n), triton.cdiv(K, block_k))](
                weight, scale, zero, out, N, K, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
        return out
    block_n, block_k = 16, min(256, triton.next_power_of_2(K))
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    with device_of(weight):
        _dequantize_kernel[grid](
            weight, scale, zero if zero is not None else scale, out, N, K,
            BITS=bits, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )
    return out


# -- custom ops: what the model calls on CUDA (opaque to dynamo, capturable by CUDA graphs) -----
@torch.library.custom_op(
    "chatglm_ft::gemv", mutates_args=(), device_types="cuda",
    schema="(Tensor x, Tensor weight, Tensor? bias, int act=0, Tensor? scale=None, Tensor? zero=None) -> Tensor",
)
def gemv_op(x, weight, bias, act=0, scale=None, zero=None):
    """skinny_matmul: a float weight, an int8 one with its scale, or an int4 one with its scale and zero."""
    return skinny_matmul(x, weight, scale, zero, bias, act=act)


@gemv_op.register_fake
def _(x, weight, bias, act=0, scale=None, zero=None):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op(
    "chatglm_ft::dequantize", mutates_args=(), device_types="cuda",
    schema="(Tensor weight, Tensor scale, Tensor? zero, ScalarType dtype) -> Tensor",
)
def dequantize_op(weight, scale, zero, dtype):
    return dequantize(weight, scale, zero, dtype)


@dequantize_op.register_fake
def _(weight, scale, zero, dtype):
    k = weight.shape[1] * (1 if zero is None else 2)
    return weight.new_empty(weight.shape[0], k, dtype=dtype)
