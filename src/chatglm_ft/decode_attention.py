"""Decode attention: one query token per row over a KV cache, as a Triton kernel (CUDA; CPU only
under TRITON_INTERPRET=1).

A decode step's attention reads every visible cache column of every row and head once (128
streams at ~256 columns: ~0.5 GB per layer), so its speed is set by bytes read. Eager PyTorch
does it as a batched (1 x hd) @ (hd x S) matmul per (row, head), a poor cuBLAS case, plus
separate kernels for the float cast, the mask and the softmax. Here one program streams a range
of keys and values of one (row, head) once, with 16-byte loads, and keeps an online softmax in
float32 (flash-decoding). When rows x heads alone cannot fill the GPU (batch 1: 32 programs) the
keys are split over several programs and a second, tiny kernel combines their partial results.

Grouped key/value heads (ChatGLM2/3: 2 KV heads, each serving 16 of the 32 query heads) have their
own kernel: one program per (row, KV head) reads each K and V tile once for the whole group, whose
query heads are the rows of two tensor-core matmuls (scores = q_group @ k^T, acc += p @ v; the group
padded to the 16 rows `tl.dot` needs). There are 16x fewer (row, KV head) pairs than (row, head)
pairs (batch 1: 2), so the keys are split more often; the combine is the same, per query head.
ChatGLM-6B (as many KV heads as query heads) keeps the one-head kernel.

The mask is the model's own bool mask (B, 1, 1, S), read in the kernel (S bytes per row against
512 bytes of K and V per column and head): whatever a row may see (a left-padded batch sees
[start, column], an engine slot [0, column], an idle slot everything) needs no conversion, and
masked columns are never loaded, so padding past a row's length costs no memory traffic.

KernelOptions(decode_attention="torch") (ops.attend) turns the kernel off, for A/B measurements;
"triton" (the default) uses it on CUDA.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .kernels import device_of, use_pdl

BLOCK_S = 128  # keys per loop step: a 32 KB tile of K (and of V) at head_dim 128 (fastest of serve_bench's sweep)
NUM_WARPS = 4
PROGRAMS_PER_SM = 8  # below this many (row, head) programs per SM, keys are split over more programs
# The grouped kernel: 64-key tiles (3 pipelined stages of K and V tiles: 96 KB of shared memory at
# head_dim 128), and fewer programs per SM before splitting, since each keeps several tiles in flight
# and a split costs a partial result per query head (16 per program at ChatGLM2/3's grouping). First
# choices, to be tuned with `gpu/serve_bench.py --attention --grouped`.
GROUPED_BLOCK_S = 64
GROUPED_PROGRAMS_PER_SM = 1
LOG2E = 1.4426950408889634


# -- kernels ---------------------------------------------------------------------------------------
@triton.jit
def _visible_columns(cols, S, mask_row_ptr, stride_ms, HAS_MASK: tl.constexpr):
    """Which cache columns `cols` of a row its queries see: those before S that the row's mask allows (the
    mask is read only for those)."""
    visible = cols < S
    if HAS_MASK:
        visible = visible & (tl.load(mask_row_ptr + cols * stride_ms, mask=visible, other=0) != 0)
    return visible


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_o_ptr, part_ml_ptr,
    S, split_len, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_mb, stride_ms,
    NH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (row * NH + head, split): softmax(q . k) @ v over keys [split * split_len, +split_len) of S.

    Without SPLIT the normalised result goes to out (B, NH, hd); with it, the unnormalised sum,
    the running max (log2 units) and the exponent sum go to the partial buffers for the combine.
    """
    if PDL:  # launched early: wait for the kernels that wrote q and the cache (kernels.use_pdl)
        gdc_wait()
        gdc_launch_dependents()
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // NH).to(tl.int64)  # row offsets exceed 2**31 bytes in a large cache
    h = bh % NH
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * qk_scale  # scale and log2(e) folded in
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    lo = split * split_len

    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for offset in range(0, split_len, BLOCK_S):  # split_len is a multiple of BLOCK_S; the last split may pass S
        cols = lo + offset + tl.arange(0, BLOCK_S)
        visible = _visible_columns(cols, S, mask_ptr + b * stride_mb, stride_ms, HAS_MASK)
        # masked lanes issue no memory traffic: columns a row cannot see are never read
        k = tl.load(k_base + cols[:, None] * stride_ks + d[None, :], mask=visible[:, None], other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # (BLOCK_S,)
        scores = tl.where(visible, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # nothing visible yet: exp2(-inf - 0) = 0, not NaN
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(scores - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(v_base + cols[:, None] * stride_vs + d[None, :], mask=visible[:, None], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new

    if SPLIT:
        n_splits = tl.num_programs(1)
        part = bh * n_splits + split
        tl.store(part_o_ptr + part.to(tl.int64) * HEAD_DIM + d, acc)
        tl.store(part_ml_ptr + 2 * part, m_i)
        tl.store(part_ml_ptr + 2 * part + 1, l_i)
    else:
        tl.store(out_ptr + bh.to(tl.int64) * HEAD_DIM + d, (acc / l_i).to(out_ptr.dtype.element_ty))


@triton.jit
def _grouped_decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_o_ptr, part_ml_ptr,
    S, split_len, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_mb, stride_ms,
    NH: tl.constexpr, NKV: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """Program (row * NKV + kv head, split): the GROUP query heads of the KV head over keys
    [split * split_len, +split_len) of S, each K and V tile read once for all of them.

    The group's query heads are the rows of the matmuls (GROUP_P >= 16 rows, those past GROUP masked:
    zero queries, never stored); the online softmax keeps one max and one sum per row. Outputs as in
    the one-head kernel, per query head (row * NH + head), so the same combine kernel follows a split.
    """
    if PDL:  # launched early: wait for the kernels that wrote q and the cache (kernels.use_pdl)
        gdc_wait()
        gdc_launch_dependents()
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = (bg // NKV).to(tl.int64)  # row offsets exceed 2**31 bytes in a large cache
    g = bg % NKV
    r = tl.arange(0, GROUP_P)
    in_group = r < GROUP
    d = tl.arange(0, HEAD_DIM)
    heads = b * NH + g * GROUP + r  # (GROUP_P,) query heads as flat (row, head) indices, int64
    q = tl.load(q_ptr + b * stride_qb + (g * GROUP + r)[:, None] * stride_qh + d[None, :], mask=in_group[:, None],
                other=0.0)  # (GROUP_P, hd) in the cache's dtype: the matmul's rounding is the model's own
    k_base = k_ptr + b * stride_kb + g * stride_kh
    v_base = v_ptr + b * stride_vb + g * stride_vh
    lo = split * split_len

    m_i = tl.full([GROUP_P], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_P], dtype=tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM], dtype=tl.float32)
    for offset in range(0, split_len, BLOCK_S):  # split_len is a multiple of BLOCK_S; the last split may pass S
        cols = lo + offset + tl.arange(0, BLOCK_S)
        visible = _visible_columns(cols, S, mask_ptr + b * stride_mb, stride_ms, HAS_MASK)
        # masked lanes issue no memory traffic: columns a row cannot see are never read
        k = tl.load(k_base + cols[:, None] * stride_ks + d[None, :], mask=visible[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (GROUP_P, BLOCK_S), log2 units
        scores = tl.where(visible[None, :], scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # nothing visible yet: exp2(-inf - 0) = 0, not NaN
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(scores - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_vs + d[None, :], mask=visible[:, None], other=0.0)
        # p rounded to the cache's dtype for the tensor cores, as the PyTorch path rounds softmax before @ v
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLIT:
        n_splits = tl.num_programs(1)
        part = heads * n_splits + split
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=in_group[:, None])
        tl.store(part_ml_ptr + 2 * part, m_i, mask=in_group)
        tl.store(part_ml_ptr + 2 * part + 1, l_i, mask=in_group)
    else:
        tl.store(out_ptr + heads[:, None] * HEAD_DIM + d[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=in_group[:, None])


@triton.jit
def _combine_kernel(part_o_ptr, part_ml_ptr, out_ptr, n_splits, HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr,
                    PDL: tl.constexpr):
    """out[bh] = sum_s o_s * 2**(m_s - m) / sum_s l_s * 2**(m_s - m) over the splits of (row, head) bh."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS_P2)
    used = s < n_splits
    part = bh * n_splits + s
    m = tl.load(part_ml_ptr + 2 * part, mask=used, other=-float("inf"))
    sums = tl.load(part_ml_ptr + 2 * part + 1, mask=used, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == -float("inf"), 0.0, m_max))  # splits that saw nothing weigh 0
    d = tl.arange(0, HEAD_DIM)
    o = tl.load(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(sums * w, axis=0)
    tl.store(out_ptr + bh * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


# -- launcher (a plain function: also usable on CPU tensors under TRITON_INTERPRET=1) ---------------
@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: an H200's count, so tests exercise the same split choices
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(rows_heads: int, S: int, block_s: int, sm_count: int,
               programs_per_sm: int = PROGRAMS_PER_SM) -> tuple[int, int]:
    """(splits, keys per split): keys are split only while `rows_heads` programs (one per (row, head),
    or per (row, KV head) for grouped heads) are too few to keep every SM streaming; each split is a
    whole number of BLOCK_S tiles and none is empty."""
    tiles = triton.cdiv(S, block_s)
    wanted = triton.cdiv(programs_per_sm * sm_count, rows_heads)
    tiles_per_split = triton.cdiv(tiles, max(1, min(tiles, wanted)))
    split_len = tiles_per_split * block_s
    return triton.cdiv(S, split_len), split_len


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the kernel takes these inputs: q (B, nh, 1, hd), k/v (B, nkv, S, hd) with nkv dividing nh
    (grouped KV heads), the model's dtypes and a power-of-two head_dim, and a (B or 1, 1, 1, S) bool mask
    or none. Shape logic only, so a compiled step traces it without a graph break; anything needing a
    gradient stays eager."""
    B, nh, T, hd = q.shape
    if T != 1 or hd < 16 or hd > 256 or hd & (hd - 1) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != hd or v.shape != k.shape:
        return False
    if not 1 <= k.shape[1] <= nh or nh % k.shape[1]:  # each KV head serves nh / nkv query heads
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, B)
                             or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != k.shape[2]):
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                     block_s: int | None = None, splits: int | None = None, num_warps: int = NUM_WARPS,
                     num_stages: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd), masked) v for q (B, nh, 1, hd) over k, v (B, nkv, S, hd) -> (B, nh, 1, hd);
    with nkv < nh each KV head serves nh / nkv consecutive query heads (the grouped kernel).

    k and v may be views of a larger cache (any strides but a contiguous head_dim); `block_s`, `splits`,
    `num_warps` and `num_stages` override the defaults (benchmarks sweep them).
    """
    B, nh, _, hd = q.shape
    S, nkv = k.shape[2], k.shape[1]
    group = nh // nkv
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(B, nh, 1, hd, dtype=q.dtype, device=q.device)
    if S == 0:
        return out.fill_(float("nan"))  # as softmax over no columns
    if mask is not None:
        mask = mask.expand(B, 1, 1, S).view(torch.uint8)  # same bytes; Triton reads bytes, not int1
    if block_s is None:  # float32 (tests, golden checks): half the tile, the same bytes as 16-bit
        block_s = BLOCK_S if group == 1 else GROUPED_BLOCK_S // (2 if q.dtype == torch.float32 else 1)
    if splits is None:
        pairs, per_sm = (B * nh, PROGRAMS_PER_SM) if group == 1 else (B * nkv, GROUPED_PROGRAMS_PER_SM)
        splits, split_len = num_splits(pairs, S, block_s, _sm_count(q.device), per_sm)
    else:
        split_len = triton.cdiv(triton.cdiv(S, max(1, splits)), block_s) * block_s
        splits = triton.cdiv(S, split_len)
    split = splits > 1
    pdl = use_pdl(q)
    part_o = torch.empty(B * nh * splits, hd, dtype=torch.float32, device=q.device) if split else out
    part_ml = torch.empty(B * nh * splits, 2, dtype=torch.float32, device=q.device) if split else out
    args = (q, k, v, mask if mask is not None else q, out, part_o, part_ml,
            S, split_len, LOG2E / math.sqrt(hd),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            mask.stride(0) if mask is not None else 0, mask.stride(3) if mask is not None else 0)
    # both kernels' compile-time constants and launch options; the grouped one adds its group's
    shared = {"NH": nh, "HEAD_DIM": hd, "BLOCK_S": block_s, "HAS_MASK": mask is not None, "SPLIT": split, "PDL": pdl,
              "num_warps": num_warps, "launch_pdl": pdl, **({"num_stages": num_stages} if num_stages else {})}
    with device_of(q):
        if group == 1:
            _decode_attention_kernel[(B * nh, splits)](*args, **shared)
        else:
            _grouped_decode_attention_kernel[(B * nkv, splits)](
                *args, NKV=nkv, GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **shared,
            )
        if split:
            _combine_kernel[(B * nh,)](part_o, part_ml, out, splits, HEAD_DIM=hd,
                                       SPLITS_P2=triton.next_power_of_2(splits), PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The same result in plain PyTorch, computed in float32 (what the kernel is tested against);
    grouped KV heads are repeated to one per query head."""
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, nh, S, hd)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, nh, 1, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


# -- the custom op the model calls (opaque to dynamo, capturable by CUDA graphs: no host sync) ------
@torch.library.custom_op(
    "chatglm_ft::decode_attention", mutates_args=(), device_types="cuda",
    schema="(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor",
)
def decode_attention_op(q, k, v, mask):
    return decode_attention(q, k, v, mask)


@decode_attention_op.register_kernel("cpu")
def _(q, k, v, mask):
    return decode_attention_reference(q, k, v, mask)


@decode_attention_op.register_fake
def _(q, k, v, mask):
    return q.new_empty(q.shape[0], q.shape[1], 1, q.shape[3])
