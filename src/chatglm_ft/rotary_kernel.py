"""Rotary embedding of q and k in one Triton kernel, for eager forwards on CUDA (prefill above all):
ChatGLM-6B's rotate-half on both halves of each head (`rotary_qk`) and ChatGLM2/3's interleaved pairs
on the first half (`rotary_pairs_qk`).

Eager PyTorch applies `model.apply_rotary` as a multiply, a copy for the quarter swap and an
addcmul, each a full pass over q (and again over k): at a 2048-token prefill that is ~290 MB of
traffic per layer where reading q, k and writing them once is 64 MB. Here one program reads a token's
q or k heads from the fused query_key_value output (per-head interleaved [q | k | v]) and writes
the rotated heads, contiguous, in float32 arithmetic rounded once (what a compiled step computes).
ChatGLM2/3's rotary is computed in the activation dtype, as THUDM's implementation does: there the
kernel rounds after every product and sum, as the eager PyTorch ops do, and matches them bit for bit.
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


# -- ChatGLM2/3: interleaved pairs of the first half of each head ------------------------------------
@triton.jit
def _rotary_pairs_kernel(x_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, T, NQ, NK, stride_xb, stride_xt, stride_cb, stride_ct,
                         HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr, PAIRS_BLOCK: tl.constexpr,
                         REST_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (token, head block) over the NQ query heads and then the NK key heads, which sit one after
    the other in a query_key_value row: pair j of channels (2j, 2j+1) -> (x0 cos - x1 sin, x1 cos + x0 sin),
    each product, difference and sum rounded to x's dtype as `apply_rotary_pairs` computes them; channels
    from 2 PAIRS on are copied."""
    token = tl.program_id(0)
    b = token // T
    t = token % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = heads[:, None] < NQ + NK
    src = x_ptr + b.to(tl.int64) * stride_xb + t.to(tl.int64) * stride_xt + heads[:, None] * HEAD_DIM
    row = token.to(tl.int64)
    dst = tl.where(heads[:, None] < NQ, q_ptr + (row * NQ + heads[:, None]) * HEAD_DIM,
                   k_ptr + (row * NK + heads[:, None] - NQ) * HEAD_DIM)
    dtype = x_ptr.dtype.element_ty
    j = tl.arange(0, PAIRS_BLOCK)
    pair_ok = ok & (j[None, :] < PAIRS)
    table = b.to(tl.int64) * stride_cb + t.to(tl.int64) * stride_ct + j
    cos = tl.load(cos_ptr + table, mask=j < PAIRS, other=0.0).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + table, mask=j < PAIRS, other=0.0).to(dtype).to(tl.float32)[None, :]
    x0 = tl.load(src + 2 * j[None, :], mask=pair_ok, other=0.0).to(tl.float32)
    x1 = tl.load(src + 2 * j[None, :] + 1, mask=pair_ok, other=0.0).to(tl.float32)
    out0 = ((x0 * cos).to(dtype).to(tl.float32) - (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
    out1 = ((x1 * cos).to(dtype).to(tl.float32) + (x0 * sin).to(dtype).to(tl.float32)).to(dtype)
    tl.store(dst + 2 * j[None, :], out0, mask=pair_ok)
    tl.store(dst + 2 * j[None, :] + 1, out1, mask=pair_ok)
    if REST_BLOCK > 0:
        i = 2 * PAIRS + tl.arange(0, REST_BLOCK)
        rest_ok = ok & (i[None, :] < HEAD_DIM)
        tl.store(dst + i[None, :], tl.load(src + i[None, :], mask=rest_ok), mask=rest_ok)


def _table_strides(table: torch.Tensor) -> tuple[int, int]:
    """(batch, token) strides of a (B or 1, T or 1, 1, r/2) table: 0 where it broadcasts."""
    return tuple(table.stride(i) if table.shape[i] > 1 else 0 for i in (0, 1))


def pairs_supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """q (B, T, N, d) and k (B, T, G, d) views of one query_key_value output (k's heads right after q's,
    heads contiguous), cos/sin (B or 1, T or 1, 1, r/2) with r <= d; float16/bfloat16/float32."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 4:
        return False
    B, T, N, d = q.shape
    r2 = cos.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == q.dtype
            and q.numel() > 0 and k.shape[:2] == (B, T) and k.shape[3] == d and 0 < 2 * r2 <= d
            and q.stride(-1) == 1 and q.stride(-2) == d and k.stride() == (q.stride(0), q.stride(1), d, 1)
            and k.data_ptr() == q.data_ptr() + N * d * q.element_size()
            and cos.shape[0] in (1, B) and cos.shape[1] in (1, T) and cos.shape[2] == 1 and cos.stride(-1) == 1
            and sin.shape == cos.shape and sin.stride() == cos.stride() and sin.dtype == cos.dtype
            and cos.device == q.device)


def rotary_pairs_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.apply_rotary_pairs` of q and k in one launch: new contiguous (B, T, N, d) and (B, T, G, d),
    bit for bit what the PyTorch form gives (see `pairs_supported` for the inputs)."""
    B, T, N, d = q.shape
    G = k.shape[2]
    pairs = cos.shape[-1]
    q_out = torch.empty(B, T, N, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(B, T, G, d, dtype=q.dtype, device=q.device)
    block_h = min(triton.next_power_of_2(N + G), max(1, 2048 // d))
    rest = d - 2 * pairs
    with device_of(q):
        _rotary_pairs_kernel[(B * T, triton.cdiv(N + G, block_h))](
            q, cos, sin, q_out, k_out, T, N, G, q.stride(0), q.stride(1), *_table_strides(cos),
            HEAD_DIM=d, PAIRS=pairs, PAIRS_BLOCK=triton.next_power_of_2(pairs),
            REST_BLOCK=triton.next_power_of_2(rest) if rest else 0, BLOCK_H=block_h,
            num_warps=4, enable_fp_fusion=False,  # float32: products rounded before the sum, as in PyTorch
        )
    return q_out, k_out
