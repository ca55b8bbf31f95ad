"""Rotary embedding of q and k in one Triton kernel, for eager forwards on CUDA (prefill above all).

Eager PyTorch applies `model.apply_rotary` as a multiply, a copy for the quarter swap and an
addcmul, each a full pass over q (and again over k): at a 2048-token prefill that is ~290 MB of
traffic per layer where reading q, k and writing them once is 64 MB. Here one program reads a token's
q or k heads from the fused query_key_value output (per-head interleaved [q | k | v]) and writes
the rotated heads, contiguous, in float32 arithmetic rounded once (what a compiled step computes).
Compiled code keeps the PyTorch form: inductor fuses it into its own kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernels import device_of


@triton.jit
def _rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, T, NH, plane, stride_xb, stride_xt, stride_cb, stride_ct,
                   HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (token, q or k, head block): out[which, token, h] = x * cos + swap(x) * signed_sin, where
    swap exchanges quarters 0<->1 and 2<->3 of the head dim (rotate_half on each half, sign in sin).
    Each quarter is loaded and stored as its own contiguous block (wide memory accesses)."""
    QUARTER: tl.constexpr = HEAD_DIM // 4
    token = tl.program_id(0)
    which = tl.program_id(1)  # 0: q, 1: k
    b = token // T
    t = token % T
    heads = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = heads[:, None] < NH
    j = tl.arange(0, QUARTER)
    src = qkv_ptr + b.to(tl.int64) * stride_xb + t * stride_xt + heads[:, None] * (3 * HEAD_DIM) + which * HEAD_DIM + j[None, :]
    table = b.to(tl.int64) * stride_cb + t * stride_ct + j
    dst = out_ptr + which.to(tl.int64) * plane + token.to(tl.int64) * NH * HEAD_DIM + heads[:, None] * HEAD_DIM + j[None, :]
    for pair in tl.static_range(2):  # quarters (0, 1), then (2, 3)
        a0 = 2 * pair * QUARTER
        a1 = a0 + QUARTER
        x0 = tl.load(src + a0, mask=ok, other=0.0).to(tl.float32)
        x1 = tl.load(src + a1, mask=ok, other=0.0).to(tl.float32)
        c0 = tl.load(cos_ptr + table + a0).to(tl.float32)[None, :]
        c1 = tl.load(cos_ptr + table + a1).to(tl.float32)[None, :]
        s0 = tl.load(sin_ptr + table + a0).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + table + a1).to(tl.float32)[None, :]
        tl.store(dst + a0, (x0 * c0 + x1 * s0).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + a1, (x1 * c1 + x0 * s1).to(out_ptr.dtype.element_ty), mask=ok)


def supported(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
    """qkv (B, T, nh, 3 hd) with contiguous heads; cos/sin (B, T, 1, hd) alike; hd a power of two >= 16."""
    B, T, nh, hd3 = qkv.shape
    hd = hd3 // 3
    return (qkv.is_cuda and hd3 == 3 * hd and hd >= 16 and hd & (hd - 1) == 0 and qkv.stride(-1) == 1
            and qkv.stride(-2) == hd3 and cos.shape == (B, T, 1, hd) and cos.stride(-1) == 1
            and signed_sin.shape == cos.shape and signed_sin.stride() == cos.stride() and cos.dtype == signed_sin.dtype)


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q and k (B, T, nh, hd) each, contiguous, from qkv (B, T, nh, 3 hd) and the tables of
    `model.rotary_tables`; bit-for-bit what a compiled `apply_rotary` gives up to float32 rounding order."""
    B, T, nh, hd3 = qkv.shape
    hd = hd3 // 3
    out = torch.empty(2, B, T, nh, hd, dtype=qkv.dtype, device=qkv.device)
    block_h = min(triton.next_power_of_2(nh), max(1, 4096 // hd))  # ~4096 values per program
    grid = (B * T, 2, triton.cdiv(nh, block_h))
    with device_of(qkv):
        _rotary_kernel[grid](
            qkv, cos, signed_sin, out, T, nh, B * T * nh * hd, qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(1),
            HEAD_DIM=hd, BLOCK_H=block_h, num_warps=4,
        )
    return out[0], out[1]
