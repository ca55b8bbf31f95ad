"""Triton kernels for the quantized layers of `quantize.py` (CUDA; CPU only under TRITON_INTERPRET=1).

Batch-1 decoding reads every weight once per token, so its speed is set by bytes read: the GEMV
kernels read the packed weights exactly once, unpack them in registers and accumulate in float32
(no float16 copy of the weight is ever written). Multi-token inputs (prefill, training) instead
dequantize a layer's weight to float16 with `dequantize` and let cuBLAS do the matmul.

Integer to float conversion uses the exponent trick (`bits | 0x4B000000` read as float32 is
2**23 + bits, one integer op and one add) instead of a cvt instruction, which runs at a fraction
of the FMA rate on recent GPUs and would cap an int4 GEMV (two conversions per byte) below memory
bandwidth.

K is a compile-time constant (the model has two: 4096 and 16384): fixed trip counts and known
alignment for the compiler. Tile sizes are fixed per shape (`gemv_config`), not autotuned, so
results are reproducible; gpu/quant_bench.py sweeps alternatives. The entry points are torch
custom ops (`torch.ops.chatglm_ft.*`): torch.compile traces through them and CUDA graphs capture
them (no host sync inside).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# 2**23 as float32 bits: OR-ing a small non-negative integer into the mantissa gives 2**23 + value.
MAGIC = tl.constexpr(0x4B000000)
MAGIC_F = tl.constexpr(8388608.0)  # 2**23
# For int8: XOR with this both adds 128 to the byte (two's complement -> offset binary) and sets 2**23.
MAGIC_I8 = tl.constexpr(0x4B000080)
MAGIC_I8_F = tl.constexpr(8388736.0)  # 2**23 + 128


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # output rows per program
    block_k: int  # input columns per loop step
    num_warps: int = 4


def block_k_for(bits: int, k: int) -> int:
    """Columns per loop step: a 512-byte slice of each row for both widths (vectorised 16-byte loads)."""
    return min(512 if bits == 8 else 1024, k)


def gemv_config(bits: int, n: int, k: int) -> GemvConfig:
    """Tile sizes for one weight shape: enough programs (>= ~8 per SM of an H100/H200) to keep loads in flight."""
    return GemvConfig(block_n=8 if n >= 8192 else 4, block_k=block_k_for(bits, k), num_warps=4)


# -- kernels -------------------------------------------------------------------------------------
@triton.jit
def _int8_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, N, K: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] = scale[n] * sum_k w[n, k] * x[m, k] + bias[n]; w int8 (N, K), K % BLOCK_K == 0."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]  # (BLOCK_N, BLOCK_K)
    x_ptrs = x_ptr + m * K + cols
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs).to(tl.float32)
        w = tl.load(w_ptrs, mask=row_ok[:, None], other=0, eviction_policy="evict_first")
        # byte b (two's complement) -> 2**23 + (b + 128) -> b
        q = ((w.to(tl.int32) & 0xFF) ^ MAGIC_I8).to(tl.float32, bitcast=True) - MAGIC_I8_F
        acc += q * x[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1) * tl.load(scale_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    tl.store(y_ptr + m * N + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, N, K: tl.constexpr,
    HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] = sum_g scale[n, g] * sum_{k in g} (q[n, k] - zero[n, g]) * x[m, k] + bias[n].

    w uint8 (N, K/2): byte j holds column 2j in the high nibble and 2j+1 in the low one;
    scale/zero (N, K/GROUP); BLOCK_K % GROUP == 0 and K % BLOCK_K == 0.
    """
    HALF: tl.constexpr = BLOCK_K // 2
    NG: tl.constexpr = BLOCK_K // GROUP
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    byte_cols = tl.arange(0, HALF)
    groups = K // GROUP
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * (K // 2) + byte_cols[None, :]  # (BLOCK_N, HALF)
    x_ptrs = x_ptr + m * K + 2 * byte_cols  # even columns; odd ones are x_ptrs + 1
    meta_offsets = rows[:, None] * groups + tl.arange(0, NG)[None, :]  # (BLOCK_N, NG)
    acc = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        x_even = tl.load(x_ptrs).to(tl.float32)
        x_odd = tl.load(x_ptrs + 1).to(tl.float32)
        w = tl.load(w_ptrs, mask=row_ok[:, None], other=0, eviction_policy="evict_first").to(tl.int32)
        high = ((w >> 4) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_F
        low = ((w & 0xF) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_F
        part = high * x_even[None, :] + low * x_odd[None, :]  # (BLOCK_N, HALF)
        dot = tl.sum(tl.reshape(part, [BLOCK_N, NG, GROUP // 2]), axis=2)  # (BLOCK_N, NG)
        x_sum = tl.sum(tl.reshape(x_even + x_odd, [NG, GROUP // 2]), axis=1)  # (NG,)
        scale = tl.load(scale_ptr + meta_offsets, mask=row_ok[:, None], other=0).to(tl.float32)
        zero = tl.load(zero_ptr + meta_offsets, mask=row_ok[:, None], other=0).to(tl.float32)
        acc += (dot - zero * x_sum[None, :]) * scale
        w_ptrs += HALF
        x_ptrs += BLOCK_K
        meta_offsets += NG
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    tl.store(y_ptr + m * N + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


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
        byte = tl.load(w_ptr + rows64 * (K // 2) + cols[None, :] // 2, mask=ok, other=0).to(tl.int32)
        q = tl.where(cols[None, :] % 2 == 0, byte >> 4, byte & 0xF).to(tl.float32)
        meta = rows64 * (K // GROUP) + cols[None, :] // GROUP
        zero = tl.load(zero_ptr + meta, mask=ok, other=0).to(tl.float32)
        scale = tl.load(scale_ptr + meta, mask=ok, other=0).to(tl.float32)
        w = (q - zero) * scale
    tl.store(out_ptr + rows64 * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


# -- launchers (plain functions: also usable on CPU tensors under TRITON_INTERPRET=1) -----------
def gemv_supported(weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether the GEMV kernels take this weight (the real model's and the tiny test model's shapes do).
    Plain integer logic on shapes, so torch.compile traces it without a graph break."""
    bits = 8 if weight.dtype == torch.int8 else 4
    k = weight.shape[1] * (8 // bits)
    block_k = block_k_for(bits, k)
    if block_k < 16 or block_k & (block_k - 1) or k % block_k:
        return False
    if bits == 4:
        group = k // scale.shape[1]
        return group >= 16 and group & (group - 1) == 0 and block_k % group == 0
    return True


def device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a model on cuda:1)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              config: GemvConfig | None = None) -> torch.Tensor:
    """x (M, K) float, weight int8 (N, K), scale (N,) -> (M, N) in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    config = config or gemv_config(8, N, K)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, config.block_n), M)
    with device_of(x):
        _int8_gemv_kernel[grid](
            x.contiguous(), weight, scale, bias if bias is not None else scale, y, N, K,
            HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
        )
    return y


def int4_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              bias: torch.Tensor | None, config: GemvConfig | None = None) -> torch.Tensor:
    """x (M, K) float, weight uint8 (N, K/2), scale/zero (N, K/G) -> (M, N) in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    group = K // scale.shape[1]
    config = config or gemv_config(4, N, K)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, config.block_n), M)
    with device_of(x):
        _int4_gemv_kernel[grid](
            x.contiguous(), weight, scale, zero, bias if bias is not None else scale, y, N, K,
            HAS_BIAS=bias is not None, GROUP=group, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps,
        )
    return y


def dequantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The float (N, K) weight of an int8 (zero None) or int4 layer."""
    N = weight.shape[0]
    bits = 8 if zero is None else 4
    K = weight.shape[1] * (8 // bits)
    group = K if zero is None else K // scale.shape[1]
    out = torch.empty(N, K, dtype=dtype, device=weight.device)
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
    "chatglm_ft::int8_gemv", mutates_args=(), device_types="cuda",
    schema="(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor",
)
def int8_gemv_op(x, weight, scale, bias):
    return int8_gemv(x, weight, scale, bias)


@int8_gemv_op.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op(
    "chatglm_ft::int4_gemv", mutates_args=(), device_types="cuda",
    schema="(Tensor x, Tensor weight, Tensor scale, Tensor zero, Tensor? bias) -> Tensor",
)
def int4_gemv_op(x, weight, scale, zero, bias):
    return int4_gemv(x, weight, scale, zero, bias)


@int4_gemv_op.register_fake
def _(x, weight, scale, zero, bias):
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
