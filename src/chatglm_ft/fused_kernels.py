"""Row-wise Triton kernels for eager forwards on CUDA: RMSNorm (with the residual add before it), ChatGLM-6B's
scaled residual add with LayerNorm, and SwiGLU. Called only from ops.py.

Eager PyTorch spells RMSNorm in float32 statistics as ~7 kernels (cast, square, mean, add, rsqrt, two
products, cast back), each a pass over the activations; a residual add before a norm is one more pass
that writes what the norm then reads again. Here one program reads a token's row once and writes the
norm's output (and, with the add, the new residual stream). SwiGLU reads the gate and the up halves
once instead of writing and re-reading the SiLU.

Each kernel does the float32 arithmetic of the PyTorch form it replaces, op by op: a value is rounded
to the activation dtype exactly where PyTorch stores an intermediate tensor, and contractions into
fused multiply-adds happen only where ATen's CUDA kernels have them (an `a + alpha * b`, LayerNorm's
`gamma * y + beta`): the norms launch with fp fusion off and spell those fmas out. exp and rsqrt are
libdevice's, the functions ATen's CUDA kernels call (expf, rsqrtf), and SiLU divides correctly rounded
as they do. What still differs is the order of the float32 sums of a row (mean of squares; LayerNorm's
mean and variance, where ATen runs Welford's algorithm): the statistics may differ from ATen's in their
last bit, which moves an output by one unit of the dtype in the rare element that sat on a rounding
boundary. gpu/fused_check.py measures how often.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .kernels import device_of

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_ROW = 16384  # one program holds a whole row in registers (the models' rows: 4096)
# The kernels' PRECISE flag: libdevice's exp and rsqrt, on CUDA. Triton's interpreter (TRITON_INTERPRET=1, CPU
# tensors in the tests) has no libdevice and runs numpy's exp and 1 / sqrt instead.


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, h_ptr, y_ptr, N, inv_n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
    """Program per row: [h = x + res, rounded to the dtype, stored]; y = weight * (h * rsqrt(mean(h^2) + eps))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * N + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * N + cols, x, mask=ok)
    x = x.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) * inv_n  # ATen's mean multiplies the sum by 1/N
    if PRECISE:
        rstd = libdevice.rsqrt(mean_sq + eps)
    else:
        rstd = tl.math.rsqrt(mean_sq + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (w * (x * rstd)).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _add_layer_norm_kernel(a_ptr, x_ptr, w_ptr, b_ptr, y_ptr, N, alpha, inv_n, eps,
                           HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
    """Program per row: h = a + alpha * x (one rounding to the dtype); y = LayerNorm(h) * weight + bias."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    a = tl.load(a_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
    h = tl.fma(x, alpha, a).to(y_ptr.dtype.element_ty).to(tl.float32)  # torch.add(a, x, alpha=alpha)
    mean = tl.sum(h, axis=0) * inv_n
    d = tl.where(ok, h - mean, 0.0)
    var = tl.sum(d * d, axis=0) * inv_n  # biased, as LayerNorm's
    if PRECISE:
        rstd = libdevice.rsqrt(var + eps)
    else:
        rstd = tl.math.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = tl.fma(w, rstd * d, tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32))
    else:
        y = w * (rstd * d)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_kernel(u_ptr, y_ptr, F, stride_u, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
    """Program per (row, column block): y = silu(gate) * up for gate = u[:F], up = u[F:], each product
    rounded to the dtype as F.silu(gate) and the multiply round theirs."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    gate = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(u_ptr + row * stride_u + F + cols, mask=ok, other=0.0).to(tl.float32)
    if PRECISE:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    silu = tl.math.div_rn(gate, 1.0 + e).to(y_ptr.dtype.element_ty).to(tl.float32)  # ATen: x / (1 + exp(-x))
    tl.store(y_ptr + row * F + cols, (silu * up).to(y_ptr.dtype.element_ty), mask=ok)


def _row_launch(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of a one-row program: the row in registers, ~8-16 values a thread."""
    block = triton.next_power_of_2(n)
    return block, max(1, min(16, block // 512))


def _rows(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in FLOATS and t.is_contiguous() and t.numel() > 0 and 0 < t.shape[-1] <= MAX_ROW


# -- RMSNorm ---------------------------------------------------------------------------------------
def rms_norm_supported(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Contiguous rows of a float dtype (and a residual just like x); the weight one row on x's device."""
    return (_rows(x) and weight.shape == x.shape[-1:] and weight.is_contiguous() and weight.dtype in FLOATS
            and weight.device == x.device
            and (residual is None
                 or (residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous())))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x's rows (model_glm2.RMSNorm); with `residual`, (h, RMSNorm(h)) for h = x + residual."""
    N = x.shape[-1]
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    block, warps = _row_launch(N)
    with device_of(x):
        _rms_norm_kernel[(x.numel() // N,)](
            x, residual if residual is not None else x, weight, h if h is not None else y, y, N, 1.0 / N, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, PRECISE=x.is_cuda, num_warps=warps, enable_fp_fusion=False,
        )
    return y if h is None else (h, y)


# -- ChatGLM-6B: scaled residual + LayerNorm -------------------------------------------------------
def add_layer_norm_supported(a: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """a and x alike (contiguous rows of a float dtype); weight and bias one row each on their device."""
    N = x.shape[-1]
    return (_rows(x) and a.shape == x.shape and a.dtype == x.dtype and a.is_contiguous()
            and all(p.shape == (N,) and p.is_contiguous() and p.dtype in FLOATS and p.device == x.device
                    for p in (weight, bias) if p is not None))


def add_layer_norm(a: torch.Tensor, x: torch.Tensor, alpha: float, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    """LayerNorm(a + alpha * x) over the last dim (the sum rounded to the dtype first, as torch.add stores it)."""
    N = x.shape[-1]
    y = torch.empty_like(x)
    block, warps = _row_launch(N)
    with device_of(x):
        _add_layer_norm_kernel[(x.numel() // N,)](
            a, x, weight, bias if bias is not None else weight, y, N, alpha, 1.0 / N, eps,
            HAS_BIAS=bias is not None, BLOCK=block, PRECISE=x.is_cuda, num_warps=warps, enable_fp_fusion=False,
        )
    return y


# -- SwiGLU ----------------------------------------------------------------------------------------
def swiglu_supported(u: torch.Tensor) -> bool:
    """(.., 2F) rows of a float dtype, the last dim contiguous and the rows evenly spaced."""
    if not (u.is_cuda and u.dtype in FLOATS and u.dim() >= 2 and u.numel() > 0 and u.shape[-1] % 2 == 0
            and u.stride(-1) == 1):
        return False
    rows = u.reshape(-1, u.shape[-1]) if u.dim() > 2 else u
    return rows.data_ptr() == u.data_ptr() and rows.stride(-1) == 1  # a view (no copy) of u


def swiglu(u: torch.Tensor) -> torch.Tensor:
    """silu(u[..., :F]) * u[..., F:] (ChatGLM2/3's MLP)."""
    F = u.shape[-1] // 2
    rows = u.reshape(-1, u.shape[-1])
    y = torch.empty(*u.shape[:-1], F, dtype=u.dtype, device=u.device)
    block = min(1024, triton.next_power_of_2(F))
    with device_of(u):
        _swiglu_kernel[(rows.shape[0], triton.cdiv(F, block))](rows, y, F, rows.stride(0), BLOCK=block,
                                                               PRECISE=u.is_cuda, num_warps=4)
    return y
