"""The kernel seam: every matmul, GELU-matmul, rotary and attention of a model goes through here.

A model's code (model.py) says *what* to compute; these functions pick *how*, from the
`KernelOptions` the model was given (`use_kernels`), never from the environment:
  linear / gelu_linear  a few token rows on CUDA: the Triton skinny matmul (kernels.py, op
                        chatglm_ft::gemv), for float and int8/int4 layers alike; more rows: cuBLAS
                        (with GELU in cuBLASLt's epilogue); under torch.compile the bias is added after
                        the matmul so inductor can fuse it
  rotary, rotary_pairs  q and k rotated by one Triton kernel (rotary_kernel.py) in eager CUDA inference
                        (ChatGLM-6B's rotate-half; ChatGLM2/3's interleaved pairs)
  rms_norm, add_layer_norm, swiglu
                        a norm (after the residual add) or SwiGLU as one row-wise Triton kernel
                        (fused_kernels.py) in eager CUDA inference, with the PyTorch form's rounding
  attend                flash-decoding (decode_attention.py) for one query row on CUDA, k/v with as many
                        heads as q (ChatGLM-6B) or fewer (grouped KV heads, ChatGLM2/3: one program reads
                        a KV head's cache once for its whole group of query heads); SDPA otherwise
Compiled code and training keep the plain PyTorch forms (inductor fuses them; autograd needs them).
All fused eager paths are behind `KernelOptions.fused` (off: the plain forms everywhere, for A/B runs); the
norm, SwiGLU and pair-rotary kernels and the grouped decode attention also need `KernelOptions.new_kernels`
(on by default; off for A/B runs).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .options import KernelOptions

DEFAULT_KERNELS = KernelOptions()
# Whether the Triton kernels can run here at all (a fact of the installation, not a choice). They are
# imported on first use with CUDA tensors: Triton takes seconds to import.
TRITON = importlib.util.find_spec("triton") is not None


def use_kernels(module: nn.Module, options: KernelOptions) -> None:
    """Give `options` to every layer of `module` that calls this seam (they keep them as `.kernels`)."""
    options.validate()
    for m in module.modules():
        if hasattr(m, "kernels"):
            m.kernels = options


_KERNELS: list = []  # kernels.py once imported (an import statement per matmul would cost a microsecond each)


def _kernels():
    if not _KERNELS:
        from . import kernels  # registers torch.ops.chatglm_ft.gemv

        _KERNELS.append(kernels)
    return _KERNELS[0]


def skinny_rows(options: KernelOptions, quantized: bool = False) -> int:
    """Most token rows a float (or `quantized`) layer's matmul runs on the skinny kernel with these options
    (0: never), on CUDA."""
    if not (TRITON and options.gemv == "kernel"):
        return 0
    return options.quantized_rows if quantized else options.float_rows


def _quantized(layer: nn.Module) -> bool:
    return hasattr(layer, "weight_scale")  # quantize.QuantizedLinear (not imported: it imports the model)


def _skinny(layer: nn.Module, x: torch.Tensor, options: KernelOptions) -> bool:
    """Whether `layer(x)` runs the skinny-matmul kernel (a float or quantized linear layer, a few token
    rows, inference on CUDA, the kernel chosen)."""
    if not (x.is_cuda and not torch.is_grad_enabled()):
        return False
    quantized = _quantized(layer)
    if not (quantized or type(layer) is nn.Linear):
        return False
    rows = skinny_rows(options, quantized)
    if not (rows and x.numel() <= rows * x.shape[-1]):
        return False
    return _kernels().gemv_supported(layer.weight, layer.weight_scale if quantized else None)


def _skinny_linear(layer: nn.Module, x: torch.Tensor, act: int = 0) -> torch.Tensor:
    scale = zero = None
    if _quantized(layer):
        scale, zero = layer.weight_scale, layer.weight_zero
    y = torch.ops.chatglm_ft.gemv(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias, act, scale, zero)
    return y.view(*x.shape[:-1], y.shape[-1])


def eager_cuda_inference(x: torch.Tensor) -> bool:
    """Inference on CUDA outside torch.compile: where our fused eager paths replace several PyTorch kernels
    (compiled code keeps the plain form, which inductor fuses itself; training keeps autograd's)."""
    return x.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _fused(x: torch.Tensor, options: KernelOptions) -> bool:
    """Whether a fused eager kernel may replace the PyTorch form here (it still checks the inputs)."""
    return options.fused and TRITON and eager_cuda_inference(x)


def _fused_new(x: torch.Tensor, options: KernelOptions) -> bool:
    """_fused, for the kernels switched by KernelOptions.new_kernels (A/B runs)."""
    return options.new_kernels and _fused(x, options)


def linear(layer: nn.Module, x: torch.Tensor, options: KernelOptions = DEFAULT_KERNELS) -> torch.Tensor:
    """`layer(x)`; under torch.compile a plain nn.Linear adds its bias after the matmul instead, because
    inductor turns a bias-free one-token matmul into a tuned reduction (GEMV) and fuses the bias and
    what follows into it, where an addmm stays a separate cuBLAS call."""
    if _skinny(layer, x, options):
        return _skinny_linear(layer, x)
    if type(layer) is nn.Linear and layer.bias is not None and torch.compiler.is_compiling():
        return F.linear(x, layer.weight) + layer.bias
    if _quantized(layer):  # the row limit of these options (gemv="cublas": none) also where _skinny said no
        from .quantize import quantized_linear

        return quantized_linear(x, layer.weight, layer.weight_scale, layer.weight_zero, layer.bias,
                                max_rows=skinny_rows(options, quantized=True))
    return layer(x)


def gelu_linear(layer: nn.Module, x: torch.Tensor, options: KernelOptions = DEFAULT_KERNELS) -> torch.Tensor:
    """GELU(layer(x)) (tanh approximation), applied before the result is rounded to x's dtype: by the
    skinny kernel for a few rows, by cuBLASLt's GELU epilogue for more (no separate pass over the 4h-wide
    activation: 134 MB each way per layer at a 2048-token prefill)."""
    if type(layer) is nn.Linear and _skinny(layer, x, options):  # quantized layers: GELU after (as measured so far)
        return _skinny_linear(layer, x, act=1)
    if (options.fused and type(layer) is nn.Linear and layer.bias is not None and eager_cuda_inference(x)
            and x.dtype in (torch.float16, torch.bfloat16)):
        y = torch._addmm_activation(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight.t(), use_gelu=True)
        return y.view(*x.shape[:-1], y.shape[-1])
    return F.gelu(linear(layer, x, options), approximate="tanh")


# -- rotary ----------------------------------------------------------------------------------------
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary applied separately to each half of the head dim. x: (B, T, nh, hd).

    rotate_half per half is [x1, x2] -> [-x2, x1]; the swap is a flip of the quarters, the sign is in signed_sin.
    """
    swapped = x.unflatten(-1, (2, 2, -1)).flip(-2).flatten(-3)  # quarters [x1, x2, x3, x4] -> [x2, x1, x4, x3]
    return torch.addcmul(x * cos, swapped, signed_sin)


def rotary(qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           options: KernelOptions = DEFAULT_KERNELS) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM's rotary of q and k (views of the per-head interleaved `qkv`): one kernel in eager CUDA inference."""
    if _fused(qkv, options):
        from . import rotary_kernel  # Triton is imported on CUDA only

        if rotary_kernel.supported(qkv, cos, sin):
            return rotary_kernel.rotary_qk(qkv, cos, sin)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def apply_rotary_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ChatGLM2/3's rotary: rotate channel pairs (2k, 2k+1) of the first r channels of x (B, T, heads, d) by
    angle k (cos, sin: (B, T, 1, r/2)); the rest pass. Computed in x's dtype, as the original."""
    r = cos.shape[-1] * 2
    rot, rest = x[..., :r], x[..., r:]
    pairs = rot.unflatten(-1, (-1, 2))  # (B, T, heads, r/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


def rotary_pairs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 options: KernelOptions = DEFAULT_KERNELS) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary_pairs` of q (B, T, N, d) and k (B, T, G, d): one kernel in eager CUDA inference when they
    are views of one query_key_value output (bit for bit the PyTorch form's values)."""
    if _fused_new(q, options):
        from . import rotary_kernel  # Triton is imported on CUDA only

        if rotary_kernel.pairs_supported(q, k, cos, sin):
            return rotary_kernel.rotary_pairs_qk(q, k, cos, sin)
    return apply_rotary_pairs(q, cos, sin), apply_rotary_pairs(k, cos, sin)


# -- norms and activations ---------------------------------------------------------------------------
def rms_norm(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
             options: KernelOptions = DEFAULT_KERNELS):
    """`layer(x)` for an RMSNorm layer (`weight`, `eps`: model_glm2.RMSNorm); with `residual`, the pair
    (h, layer(h)) for h = x + residual. One kernel in eager CUDA inference: the statistics in float32 as
    the layer's, possibly summed in another order (fused_kernels.py)."""
    if _fused_new(x, options):
        from . import fused_kernels

        if fused_kernels.rms_norm_supported(x, layer.weight, residual):
            return fused_kernels.rms_norm(x, layer.weight, layer.eps, residual)
    if residual is None:
        return layer(x)
    h = x + residual
    return h, layer(h)


def add_layer_norm(layer: nn.LayerNorm, a: torch.Tensor, x: torch.Tensor, alpha: float,
                   options: KernelOptions = DEFAULT_KERNELS) -> torch.Tensor:
    """`layer(torch.add(a, x, alpha=alpha))` (ChatGLM-6B's scaled residual, then LayerNorm): one kernel in
    eager CUDA inference, which reads a and x once and never writes the sum."""
    if _fused_new(x, options) and type(layer) is nn.LayerNorm and len(layer.normalized_shape) == 1:
        from . import fused_kernels

        if fused_kernels.add_layer_norm_supported(a, x, layer.weight, layer.bias):
            return fused_kernels.add_layer_norm(a, x, alpha, layer.weight, layer.bias, layer.eps)
    return layer(torch.add(a, x, alpha=alpha))


def swiglu(u: torch.Tensor, options: KernelOptions = DEFAULT_KERNELS) -> torch.Tensor:
    """silu(gate) * up for u = [gate | up] (.., 2F) (ChatGLM2/3's MLP): one kernel in eager CUDA inference."""
    if _fused_new(u, options):
        from . import fused_kernels

        if fused_kernels.swiglu_supported(u):
            return fused_kernels.swiglu(u)
    gate, up = u.chunk(2, dim=-1)
    return F.silu(gate) * up


# -- attention -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptMask:
    """The prefix mask of one unpadded prompt whose only <sop> is its last token (SPEC.md section 3),
    given as its context length instead of a (1, 1, T, T) bool tensor: the columns before <sop> see
    each other both ways and <sop> sees everything, so attention is two mask-free calls for which
    SDPA can pick its flash kernel (any explicit mask rules flash out)."""

    context: int  # column of <sop>, >= 1
    prefix: int = 0  # P-Tuning: key columns before the prompt, visible to every row (ptuning.py)


def decode_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, options: KernelOptions) -> bool:
    """Whether `attend` runs the flash-decoding kernel: one query row on CUDA, k/v with nh or fewer heads
    (any divisor of nh: grouped KV heads) (shape logic only: traced without a graph break)."""
    if not (q.shape[2] == 1 and q.is_cuda and TRITON and options.decode_attention == "triton"):
        return False
    if k.shape[1] != q.shape[1] and not options.new_kernels:  # the grouped kernel (new_kernels: A/B switch)
        return False
    from . import decode_attention  # imported here: Triton is loaded on a GPU only (registers the op)

    return isinstance(mask, torch.Tensor | None) and decode_attention.supported(q, k, v, mask)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | PromptMask | None,
           options: KernelOptions = DEFAULT_KERNELS, *, causal: bool = False) -> torch.Tensor:
    """Softmax attention of q (B, nh, T, hd) over k, v (B, nkv, S, hd) where `mask` (B, 1, T, S) is True
    (None: every key; with `causal` and T == S, each query sees the keys up to its own).
    With nkv < nh each KV head serves nh / nkv consecutive query heads (grouped KV heads)."""
    if decode_kernel_applies(q, k, v, mask, options):  # one streaming pass over the cache (flash-decoding)
        return torch.ops.chatglm_ft.decode_attention(q, k, v, mask)
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    if isinstance(mask, PromptMask):
        if nkv != nh:
            k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        c, kc = mask.context, mask.prefix + mask.context  # query rows before <sop>, key columns they see
        sop = F.scaled_dot_product_attention(q[:, :, c:], k, v)  # (B, nh, 1, hd)
        if not torch.is_grad_enabled():
            # every row over the context columns, then the <sop> row replaced in place: the output keeps
            # the kernel's (B, T, nh, hd) layout, so the caller's transpose-reshape copies nothing
            out = F.scaled_dot_product_attention(q, k[:, :, :kc], v[:, :, :kc])
            out[:, :, c:] = sop
            return out
        before = F.scaled_dot_product_attention(q[:, :, :c], k[:, :, :kc], v[:, :, :kc])  # (B, nh, c, hd)
        return torch.cat([before, sop], dim=2)
    if T == 1:
        # One query row (decoding) off the kernel (CPU, or KernelOptions(decode_attention="torch")): two
        # batched matrix-vector products spread over all keys, where the fused kernels give each head's
        # single row to one block; compiled, they become reductions.
        # Grouped heads fold into query rows of their KV head: the cache is read once, never copied.
        qg = q.reshape(B, nkv, nh // nkv, hd) * hd ** -0.5
        scores = (qg @ k.transpose(-1, -2)).float()  # (B, nkv, nh/nkv, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # (B, 1, 1, S) broadcasts over heads
        return (scores.softmax(dim=-1).to(v.dtype) @ v).reshape(B, nh, 1, hd)
    if causal and mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)
