"""Weight-only INT8/INT4 quantization as a module swap (DESIGN.md habit 5).

Every Linear inside the layers becomes an `Int8Linear` or `Int4Linear` (optionally the embeddings
and `lm_head` too), on `meta`, before any weight exists; `load_quantized` then quantizes each
float tensor as its shard is read, so the float16 model never has to fit on the device. On the CPU in
float32, the embeddings and lm_head that stay float are kept in float16 as checkpoints store them
(`HalfStoredEmbedding`, `HalfStoredLinear`): half their memory and half the lm_head's bytes per token.

Formats (row-major like `nn.Linear.weight`; the tensor names are the original ones + suffixes):
- int8: `weight` int8 (out, in), `weight_scale` float16 (out,); w ~= q * scale, symmetric per
  output channel, scale = max|w| / 127. This is exactly THUDM's `quantization_bit: 8` layout.
- int4: `weight` uint8 (out, in/2) packed by group halves: in each group of G columns, byte j holds
  column j in the low nibble and column j + G/2 in the high one (THUDM's order, column 2j in the
  high nibble of byte j, and our first format are repacked when loaded: config.json's
  `quantization.packing`); `weight_scale` float16 and `weight_zero` uint8, both (out, in/G), one per
  group of G columns; w ~= (q - zero) * scale with q in 0..15. Asymmetric because it halves the
  error on heavy-tailed weights (relative output MSE, group 128: Student-t(3) weights 0.027
  asymmetric vs 0.050 symmetric, Gaussian 0.010 vs 0.014) for 1/128 byte more per weight.
  THUDM's int4 (signed nibbles, one scale per row) maps onto it exactly: nibble ^ 8, zero = 8.
Checkpoints written by `chatglm-ft quantize` record the scheme in config.json (`quantization`).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_quant
from .checkpoint import assign_tensor, expected_shapes, load_weights, save_checkpoint
from .config import ChatGLMConfig
from .errors import ChatGLMError, CheckpointError
from .model import ChatGLMForConditionalGeneration

# Triton kernels on CUDA; set False to force the PyTorch reference path (benchmarks compare both).
USE_TRITON = importlib.util.find_spec("triton") is not None
if USE_TRITON:
    from . import kernels

FORMAT = "chatglm-ft"
OWN_FORMAT_ARCHITECTURE = "ChatGLMForConditionalGenerationChatglmFtQuantized"  # config.json `architectures`
INT4_PACKING = "group-halves"  # config.json `quantization.packing`; absent = "pairs" (THUDM's order)
DEFAULT_GROUP_SIZE = 128


# -- the scheme ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantScheme:
    bits: int  # 8 or 4
    group_size: int = DEFAULT_GROUP_SIZE  # int4 only: columns per scale/zero (capped at in_features)
    embeddings: bool = False  # also quantize word_embeddings and lm_head

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ChatGLMError(f"quantization bits must be 4 or 8, not {self.bits}")
        g = self.group_size
        if g < 16 or g & (g - 1):
            raise ChatGLMError(f"group size must be a power of two >= 16 (e.g. 64 or 128), not {g}")

    @classmethod
    def parse(cls, value: "str | int | dict | QuantScheme | None") -> "QuantScheme | None":
        """`"int8"`, `"int4"`, 8, 4, a dict like the config entry, or a QuantScheme."""
        if value is None or isinstance(value, QuantScheme):
            return value
        if isinstance(value, dict):
            return cls(bits=int(value["bits"]), group_size=int(value.get("group_size", DEFAULT_GROUP_SIZE)),
                       embeddings=bool(value.get("embeddings", False)))
        names = {"int8": 8, "int4": 4, "8": 8, "4": 4, 8: 8, 4: 4}
        if value not in names:
            raise ChatGLMError(f"unknown quantization {value!r}; use int8 or int4")
        return cls(bits=names[value])

    def config_entry(self, *, lm_head_tied: bool) -> dict[str, Any]:
        return {"format": FORMAT, "bits": self.bits, "group_size": self.group_size if self.bits == 4 else None,
                "packing": INT4_PACKING if self.bits == 4 else None,
                "embeddings": self.embeddings, "lm_head_tied": lm_head_tied}


def group_size_for(in_features: int, group_size: int) -> int:
    """The int4 group of a layer: the requested size (capped at the width) when it divides the width, else
    the largest power of two >= 16 below it that does, else the whole row (per channel, as THUDM's int4).
    Deterministic in (width, request), so loading derives the same; config.json records fallbacks."""
    group = min(group_size, in_features)
    if in_features % group == 0:
        return group
    power = 1 << (group.bit_length() - 1)
    while power >= 16:
        if in_features % power == 0:
            return power
        power //= 2
    if in_features % 2:
        raise ChatGLMError(f"in_features {in_features} is odd: int4 packs two columns per byte")
    return in_features


def record_group_sizes(model: nn.Module, entry: dict[str, Any]) -> dict[str, Any]:
    """config.json's `quantization` entry, plus `group_size_fallbacks` {layer: group} where a layer's width
    made its int4 group differ from the requested one."""
    fallbacks = {name: m.group_size for name, m in model.named_modules()
                 if isinstance(m, QuantizedWeight) and m.bits == 4
                 and m.group_size != min(entry["group_size"], 2 * m.weight.shape[1])}  # packed: 2 columns a byte
    if fallbacks:
        entry["group_size_fallbacks"] = fallbacks
    return entry


# -- quantize / dequantize (PyTorch reference; also the CPU path) ------------------------------
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in), float16 scale (out,); the scale is rounded to float16 first
    so that q is computed against the scale that is stored."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).to(torch.float16)
    divisor = torch.where(scale == 0, 1.0, scale.float())
    q = (w / divisor[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> packed uint8 (out, in/2), float16 scale (out, in/G), uint8 zero (out, in/G)."""
    N, K = weight.shape
    G = group_size_for(K, group_size)
    w = weight.float().view(N, K // G, G)
    # the range always includes 0 so that the zero point is an integer in 0..15
    low, high = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scale = ((high - low) / 15).to(torch.float16)
    divisor = torch.where(scale == 0, 1.0, scale.float())
    zero = (-low / divisor).round().clamp(0, 15)
    q = (w / divisor[..., None] + zero[..., None]).round().clamp(0, 15).to(torch.uint8)
    return pack_int4(q.view(N, K), G), scale, zero.to(torch.uint8)


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) uint8 in 0..15 -> (N, K/2) packed by group halves: in each group of G columns, byte j
    holds column j in the low nibble and column j + G/2 in the high one (so a kernel pairs each
    nibble plane with a contiguous slice of the input)."""
    N, K = q.shape
    g = q.view(N, K // group_size, 2, group_size // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).view(N, K // 2)


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K/2) uint8 packed by group halves -> (N, K) uint8 in 0..15."""
    N = packed.shape[0]
    g = packed.view(N, -1, group_size // 2)
    return torch.stack([g & 0xF, g >> 4], dim=2).view(N, -1)


def pack_pairs_to_halves(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """THUDM's (and our first format's) order, column 2j in the high nibble of byte j, -> group halves."""
    q = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(packed.shape[0], -1)
    return pack_int4(q, group_size)


def dequantize_reference(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                         dtype: torch.dtype) -> torch.Tensor:
    """Float (N, K) weight of an int8 (zero None) or int4 layer, computed in float32 (in place: one
    float buffer, the layer's size)."""
    if zero is None:
        return weight.float().mul_(scale.float()[:, None]).to(dtype)
    N, groups = scale.shape
    K = weight.shape[1] * 2
    q = unpack_int4(weight, K // groups)
    w = q.view(N, groups, K // groups).float()  # (N, groups, G)
    return w.sub_(zero[..., None]).mul_(scale.float()[..., None]).view(N, K).to(dtype)


WIDEN_BLOCK = 1 << 22  # weights made float at a time by the block-by-block paths (16 MB of float32)


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   bias: torch.Tensor | None, *, block_elements: int = WIDEN_BLOCK) -> torch.Tensor:
    """The PyTorch path: dequantize a block of output rows at a time, so the float working copy is
    16 MB instead of the whole layer (bounded memory on the CPU, and it stays in cache)."""
    def rows_of(rows: slice) -> torch.Tensor:
        return dequantize_reference(weight[rows], scale[rows], zero[rows] if zero is not None else None, x.dtype)

    return linear_by_rows(x, rows_of, weight.shape[0], bias, block_elements=block_elements)


def linear_by_rows(x: torch.Tensor, rows_of, out_features: int, bias: torch.Tensor | None, *,
                   block_elements: int = WIDEN_BLOCK) -> torch.Tensor:
    """F.linear(x, W, bias) where `rows_of(slice)` gives rows of W in x's dtype, a block of about
    `block_elements` weights at a time (the whole of W when it is that small)."""
    N, K = out_features, x.shape[-1]
    step = max(1, block_elements // K)
    if step >= N:
        return F.linear(x, rows_of(slice(0, N)), bias)
    out = x.new_empty(*x.shape[:-1], N)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        out[..., rows] = F.linear(x, rows_of(rows), bias[rows] if bias is not None else None)
    return out


def dequantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if weight.is_cuda and USE_TRITON:
        return torch.ops.chatglm_ft.dequantize(weight, scale, zero, dtype)
    return dequantize_reference(weight, scale, zero, dtype)


class DequantizedMatmul(torch.autograd.Function):
    """x @ W.T with W dequantized on the fly in forward AND backward: training through a quantized
    layer (QLoRA) keeps only the integer weight, never a float copy per layer."""

    @staticmethod
    def forward(ctx, x, weight, scale, zero):
        ctx.save_for_backward(weight, scale, zero)
        return F.linear(x, dequantize(weight, scale, zero, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, scale, zero = ctx.saved_tensors
        return grad @ dequantize(weight, scale, zero, grad.dtype), None, None, None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     bias: torch.Tensor | None, *, max_rows: int | None = None) -> torch.Tensor:
    """y = x @ dequantize(weight).T + bias. Inputs of up to `max_rows` token rows on CUDA run the fused GEMV
    kernel (default kernels.MAX_ROWS; 0: never; ops.linear passes ops.skinny_rows of its KernelOptions);
    on the CPU cpu_quant's C++ kernels (switched by cpu_quant.enabled) read the integer weight."""
    K, N = x.shape[-1], weight.shape[0]
    rows = x.numel() // K
    # the custom ops have no backward: anything that needs a gradient takes the autograd path
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if (x.is_cuda and USE_TRITON and rows <= (kernels.MAX_ROWS if max_rows is None else max_rows) and not needs_grad
            and kernels.gemv_supported(weight, scale)):
        y = torch.ops.chatglm_ft.gemv(x.reshape(rows, K), weight, bias, 0, scale, zero)
        return y.view(*x.shape[:-1], N)
    if not x.is_cuda and not needs_grad and cpu_quant.usable(x, weight, scale):
        return cpu_quant.linear(x, weight, scale, zero, bias)  # reads the integer weight, no float copy
    if needs_grad:
        y = DequantizedMatmul.apply(x, weight, scale, zero)
        return y + bias if bias is not None else y
    if x.is_cuda and USE_TRITON:
        return F.linear(x, dequantize(weight, scale, zero, x.dtype), bias)  # one float16 layer, then cuBLAS
    return blocked_linear(x, weight, scale, zero, bias)


# -- modules -------------------------------------------------------------------------------------
def quantized_shapes(bits: int, rows: int, cols: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored tensors of one quantized (rows, cols) weight, by suffix."""
    if bits == 8:
        return {"weight": (rows, cols), "weight_scale": (rows,)}
    groups = cols // group_size_for(cols, group_size)
    return {"weight": (rows, cols // 2), "weight_scale": (rows, groups), "weight_zero": (rows, groups)}


class QuantizedWeight:
    """The integer weight (`weight` parameter, never trainable) + `weight_scale` (+ `weight_zero`) buffers."""

    bits: int

    def _init_quantized(self, rows: int, cols: int, group_size: int, device) -> None:
        shapes = quantized_shapes(self.bits, rows, cols, group_size)
        self.group_size = group_size_for(cols, group_size) if self.bits == 4 else cols
        dtype = torch.int8 if self.bits == 8 else torch.uint8
        self.weight = nn.Parameter(torch.empty(shapes["weight"], dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(shapes["weight_scale"], dtype=torch.float16, device=device))
        zero = torch.empty(shapes["weight_zero"], dtype=torch.uint8, device=device) if self.bits == 4 else None
        self.register_buffer("weight_zero", zero)

    def set_quantized(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = scale
        self.weight_zero = zero

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this layer computes with (for merging adapters, tests, debugging)."""
        return dequantize(self.weight, self.weight_scale, self.weight_zero, dtype)


class QuantizedLinear(QuantizedWeight, nn.Linear):
    """An `nn.Linear` subclass, so PEFT's LoRA wraps it like any Linear and calls its forward; it
    never allocates a float weight (nn.Linear.__init__ is bypassed)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 group_size: int = DEFAULT_GROUP_SIZE, device=None, dtype=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self._init_quantized(out_features, in_features, group_size, device)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.weight_scale, self.weight_zero, self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, bits={self.bits}{group}"


class Int8Linear(QuantizedLinear):
    bits = 8


class Int4Linear(QuantizedLinear):
    bits = 4


class QuantizedEmbedding(QuantizedWeight, nn.Module):
    """Quantized `word_embeddings`: rows are dequantized after the lookup. Its storage has the layout
    of a quantized `lm_head`, so a tied lm_head shares it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bits: int,
                 group_size: int = DEFAULT_GROUP_SIZE, device=None, dtype=None):
        nn.Module.__init__(self)
        self.bits = bits
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._init_quantized(num_embeddings, embedding_dim, group_size, device)
        # zero-size tensor that carries the compute dtype through model.to(...)
        self.register_buffer("dtype_carrier", torch.empty(0, dtype=dtype, device=device), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        zero = self.weight_zero[ids] if self.weight_zero is not None else None
        rows = dequantize_reference(self.weight[ids], self.weight_scale[ids], zero, self.dtype_carrier.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


# -- float16-stored embeddings and lm_head (quantized models on the CPU) ----------------------------
# Released checkpoints store word_embeddings and lm_head in float16. A quantized model on the CPU
# computes in float32 but keeps these two as stored: half the memory, and half the bytes the lm_head
# reads per token (cpu_quant.half_linear widens each weight in registers), with the same results.
class HalfStoredLinear(nn.Module):
    """A bias-free, frozen Linear whose weight is stored in float16 and computed in the input's dtype: a
    quantized CPU model's lm_head (ChatGLM2/3: `transformer.output_layer`). A few CPU token rows run
    cpu_quant's kernel; more rows, or a gradient for the input (LoRA training), widen a block of rows
    at a time, so a float32 copy of the whole weight is never made."""

    def __init__(self, in_features: int, out_features: int, *, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight = torch.empty(out_features, in_features, dtype=torch.float16, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return WidenedMatmul.apply(x, self.weight)
        if cpu_quant.half_usable(x, self.weight):
            return cpu_quant.half_linear(x, self.weight, None)
        return widened_linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False, stored=float16"


def widened_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with the 16-bit weight widened to x's dtype a block of rows at a time."""
    return linear_by_rows(x, lambda rows: weight[rows].to(x.dtype), weight.shape[0], None)


class WidenedMatmul(torch.autograd.Function):
    """`widened_linear` with a gradient for x only (the weight is frozen): backward widens the weight a
    block of rows at a time again instead of keeping a float copy for it."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return widened_linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        N, K = weight.shape
        step = max(1, WIDEN_BLOCK // K)
        grad_x = grad.new_zeros(*grad.shape[:-1], K)
        for r in range(0, N, step):
            grad_x += grad[..., r:r + step] @ weight[r:r + step].to(grad.dtype)
        return grad_x, None


class HalfStoredEmbedding(nn.Module):
    """`word_embeddings` stored in float16: the looked-up rows are converted to the compute dtype (carried
    through model.to(...) by a zero-size buffer, as QuantizedEmbedding's). A tied lm_head shares its weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        weight = torch.empty(num_embeddings, embedding_dim, dtype=torch.float16, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("dtype_carrier", torch.empty(0, dtype=dtype, device=device), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight).to(self.dtype_carrier.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, stored=float16"


def keeps_float16_embeddings(scheme: QuantScheme, requested: bool | None, *, device: torch.device,
                             dtype: torch.dtype) -> bool:
    """Whether a quantized model keeps word_embeddings and lm_head in float16: as asked, or by default on
    the CPU in float32 (where they would otherwise be widened to float32 in memory) unless they are quantized."""
    if requested is None:
        return device.type == "cpu" and dtype == torch.float32 and not scheme.embeddings
    if requested and scheme.embeddings:
        raise ChatGLMError("float16_embeddings keeps the embeddings and lm_head in float16; they cannot also be "
                           "quantized (drop one of the two)")
    return requested


def store_float16_embeddings(model: ChatGLMForConditionalGeneration) -> None:
    """Swap word_embeddings and lm_head for their float16-stored forms, their values rounded to float16
    (exact for weights read from a float16 checkpoint), a tied lm_head still tied; on `meta` (before
    loading) or on a model in memory. The compute dtype stays the embeddings' dtype."""
    names = {id(m): name for name, m in model.named_modules()}
    emb, head, tied = model.transformer.word_embeddings, model.lm_head, model.lm_head_tied
    device, dtype = emb.weight.device, emb.weight.dtype
    new_emb = HalfStoredEmbedding(emb.num_embeddings, emb.embedding_dim, device="meta")
    new_emb.weight = nn.Parameter(emb.weight.detach().to(torch.float16), requires_grad=False)
    new_emb.dtype_carrier = torch.empty(0, dtype=dtype, device=device)
    new_head = HalfStoredLinear(head.in_features, head.out_features, device="meta")
    new_head.weight = new_emb.weight if tied else nn.Parameter(head.weight.detach().to(torch.float16), requires_grad=False)
    for old, new in ((emb, new_emb), (head, new_head)):
        parent, _, child = names[id(old)].rpartition(".")
        setattr(model.get_submodule(parent), child, new)


def layers_prefix(config) -> str:
    """Where the transformer blocks live: the quantized Linears of THUDM's formats are the ones inside."""
    return "transformer.layers." if getattr(config, "family", "chatglm") == "chatglm" else "transformer.encoder.layers."


def linear_class(bits: int) -> type[QuantizedLinear]:
    return Int8Linear if bits == 8 else Int4Linear


def swap_modules(model: ChatGLMForConditionalGeneration, scheme: QuantScheme) -> list[str]:
    """Replace every Linear inside the layers (and, with `scheme.embeddings`, word_embeddings and
    lm_head) by its quantized counterpart on the same device/dtype; returns the swapped module names."""
    cls = linear_class(scheme.bits)
    swapped = []
    prefix = layers_prefix(model.config)
    if scheme.embeddings and prefix != "transformer.layers.":
        raise ChatGLMError("quantized embeddings are supported for ChatGLM-6B only; drop --quantize-embeddings")
    for name, module in list(model.named_modules()):
        if not name.startswith(prefix) or type(module) is not nn.Linear:
            continue
        parent, _, child = name.rpartition(".")
        new = cls(module.in_features, module.out_features, bias=module.bias is not None,
                  group_size=scheme.group_size, device=module.weight.device, dtype=module.weight.dtype)
        setattr(model.get_submodule(parent), child, new)
        swapped.append(name)
    if scheme.embeddings:
        emb = model.transformer.word_embeddings
        model.transformer.word_embeddings = QuantizedEmbedding(
            emb.num_embeddings, emb.embedding_dim, bits=scheme.bits, group_size=scheme.group_size,
            device=emb.weight.device, dtype=emb.weight.dtype)
        head = model.lm_head
        model.lm_head = cls(head.in_features, head.out_features, bias=False, group_size=scheme.group_size,
                            device=head.weight.device, dtype=head.weight.dtype)
        swapped += ["transformer.word_embeddings", "lm_head"]
    return swapped


@torch.no_grad()
def quantize_tensor(weight: torch.Tensor, scheme: QuantScheme, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize a float (N, K) weight on `device`, a slice of rows at a time: the float32 working
    copies stay around 256 MB even for the 130k x 4096 embeddings (they add to the load's peak)."""
    N, K = weight.shape
    shapes = quantized_shapes(scheme.bits, N, K, scheme.group_size)
    q = torch.empty(shapes["weight"], dtype=torch.int8 if scheme.bits == 8 else torch.uint8, device=device)
    scale = torch.empty(shapes["weight_scale"], dtype=torch.float16, device=device)
    zero = torch.empty(shapes["weight_zero"], dtype=torch.uint8, device=device) if scheme.bits == 4 else None
    step = max(1, (1 << 24) // K)
    for start in range(0, N, step):
        chunk = weight[start:start + step].to(device)
        if scheme.bits == 8:
            q[start:start + step], scale[start:start + step] = quantize_int8(chunk)
        else:
            q[start:start + step], scale[start:start + step], zero[start:start + step] = quantize_int4(chunk, scheme.group_size)
    return q, scale, zero


def quantize_model(model: ChatGLMForConditionalGeneration, scheme: "QuantScheme | str | dict", *,
                   float16_embeddings: bool | None = None) -> ChatGLMForConditionalGeneration:
    """Quantize a float model already in memory, in place (tests; models built by `build_model`);
    `float16_embeddings` as in `load_quantized`."""
    scheme = QuantScheme.parse(scheme)
    half = keeps_float16_embeddings(scheme, float16_embeddings, device=model.device, dtype=model.dtype)
    floats = dict(model.named_modules())
    tied = model.lm_head_tied
    for name in swap_modules(model, scheme):
        old, new = floats[name], model.get_submodule(name)
        new.set_quantized(*quantize_tensor(old.weight.data, scheme, old.weight.device))
        if isinstance(new, QuantizedLinear) and new.bias is not None:
            new.bias = old.bias
        if isinstance(new, QuantizedEmbedding):
            new.dtype_carrier = torch.empty(0, dtype=old.weight.dtype, device=old.weight.device)
    if scheme.embeddings and tied:
        tie_quantized_lm_head(model)
    if half:
        store_float16_embeddings(model)
    model.config.quantization = record_group_sizes(model, scheme.config_entry(lm_head_tied=model.lm_head_tied))
    return model


def tie_quantized_lm_head(model: ChatGLMForConditionalGeneration) -> None:
    """Share the quantized embeddings' storage with lm_head (the released checkpoint ties them)."""
    emb, head = model.transformer.word_embeddings, model.lm_head
    head.weight = emb.weight
    head.weight_scale = emb.weight_scale
    head.weight_zero = emb.weight_zero


# -- loading -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredFormat:
    """How a checkpoint holds its weights: 'float', 'chatglm-ft' (ours) or 'thudm' (quantization_bit)."""

    kind: str
    scheme: QuantScheme | None = None
    lm_head_tied: bool = False
    packing: str = INT4_PACKING  # int4 nibble order of the stored weights: INT4_PACKING or "pairs"


def stored_format(config: ChatGLMConfig, source: str) -> StoredFormat:
    if config.quantization:
        entry = config.quantization
        if entry.get("format") != FORMAT:
            raise CheckpointError(f"{source}: unknown quantization format {entry.get('format')!r} in config.json")
        try:
            scheme = QuantScheme(bits=int(entry["bits"]), group_size=int(entry.get("group_size") or DEFAULT_GROUP_SIZE),
                                 embeddings=bool(entry.get("embeddings", False)))
        except (KeyError, TypeError, ValueError, ChatGLMError) as e:
            raise CheckpointError(f"{source}: bad 'quantization' entry in config.json ({e})")
        packing = entry.get("packing") or "pairs"
        if scheme.bits == 4 and packing not in (INT4_PACKING, "pairs"):
            raise CheckpointError(f"{source}: unknown int4 packing {packing!r} in config.json")
        return StoredFormat("chatglm-ft", scheme, bool(entry.get("lm_head_tied", False)), packing)
    if config.quantization_bit:
        if config.quantization_bit not in (4, 8):
            raise CheckpointError(f"{source}: quantization_bit {config.quantization_bit} is not supported (4 or 8)")
        if config.extra.get("quantization_embeddings"):
            raise CheckpointError(f"{source}: THUDM checkpoints with quantized embeddings (-qe) are not supported;"
                                  " use chatglm-6b-int4 or quantize the float model with --quantize-embeddings")
        return StoredFormat("thudm", QuantScheme(bits=config.quantization_bit), packing="pairs")
    return StoredFormat("float")


def resolve_scheme(stored: StoredFormat, requested: QuantScheme | None) -> QuantScheme:
    """The scheme of the loaded model: the checkpoint's own if pre-quantized (embeddings may be
    quantized on top), else the requested one."""
    if stored.scheme is None:
        if requested is None:
            raise ChatGLMError("load_quantized needs quantize='int8' or 'int4' for a float checkpoint")
        return requested
    if requested is not None and requested.bits != stored.scheme.bits:
        bits = stored.scheme.bits
        raise ChatGLMError(f"the checkpoint is already quantized to int{bits}; ask for int{bits} (--quantize int{bits},"
                           f" --bits {bits}) or start from the float checkpoint")
    scheme = stored.scheme
    if stored.kind == "thudm":
        # THUDM int4 has one scale per row; as groups of 128 it runs on the same kernels.
        scheme = replace(scheme, group_size=DEFAULT_GROUP_SIZE)
    return replace(scheme, embeddings=scheme.embeddings or bool(requested and requested.embeddings))


def checkpoint_shapes(config: ChatGLMConfig, stored: StoredFormat, quantized: set[str]) -> dict[str, tuple[int, ...]]:
    """The explicit key table of the checkpoint: float shapes, with the stored form of quantized weights."""
    shapes = expected_shapes(config)
    if stored.kind == "float":
        return shapes
    in_checkpoint = {m for m in quantized if m.startswith(layers_prefix(config))}
    if stored.scheme.embeddings:
        in_checkpoint |= {"transformer.word_embeddings", "lm_head"}
    for module in in_checkpoint:
        rows, cols = shapes.pop(module + ".weight")
        if module == "lm_head" and stored.lm_head_tied:
            continue
        if stored.kind == "thudm":
            stored_shapes = {"weight": (rows, cols * stored.scheme.bits // 8), "weight_scale": (rows,)}
        else:
            stored_shapes = quantized_shapes(stored.scheme.bits, rows, cols, stored.scheme.group_size)
        shapes.update({f"{module}.{suffix}": shape for suffix, shape in stored_shapes.items()})
    return shapes


class Placer:
    """The `place` hook of `load_weights`: puts each tensor where the quantized model wants it."""

    def __init__(self, model, scheme: QuantScheme, stored: StoredFormat, *, dtype, device, source: str):
        self.model, self.scheme, self.stored = model, scheme, stored
        self.dtype, self.device, self.source = dtype, device, source

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        if isinstance(module, (HalfStoredEmbedding, HalfStoredLinear)):
            assign_tensor(self.model, name, tensor.to(device=self.device, dtype=torch.float16, copy=True))
            return
        if not isinstance(module, QuantizedWeight) or attr == "bias":
            value = tensor.to(device=self.device, dtype=self.dtype if tensor.is_floating_point() else None, copy=True)
            assign_tensor(self.model, name, value)
            return
        if attr == "weight" and tensor.is_floating_point():
            self.place_float_weight(module_name, module, tensor)
        elif self.stored.kind == "thudm":
            self.place_thudm(name, module, attr, tensor)
        else:
            self.place_stored(name, module, attr, tensor)

    def place_float_weight(self, module_name: str, module: QuantizedWeight, tensor: torch.Tensor) -> None:
        quantized = quantize_tensor(tensor, self.scheme, self.device)
        if module_name == "lm_head" and self.scheme.embeddings:
            emb = self.model.transformer.word_embeddings
            stored = (emb.weight, emb.weight_scale, emb.weight_zero)
            if all(a is None and b is None or a is not None and b is not None and torch.equal(a, b)
                   for a, b in zip(quantized, stored)):
                tie_quantized_lm_head(self.model)
                return
        module.set_quantized(*quantized)

    def check_dtype(self, name: str, tensor: torch.Tensor, expected: torch.dtype) -> None:
        if tensor.dtype != expected and not (expected == torch.float16 and tensor.is_floating_point()):
            raise CheckpointError(f"{self.source}: {name} is {tensor.dtype}, expected {expected} for int{self.scheme.bits}")

    def place_stored(self, name: str, module: QuantizedWeight, attr: str, tensor: torch.Tensor) -> None:
        expected = {"weight": torch.int8 if self.scheme.bits == 8 else torch.uint8,
                    "weight_scale": torch.float16, "weight_zero": torch.uint8}[attr]
        self.check_dtype(name, tensor, expected)
        value = tensor.to(device=self.device, dtype=expected, copy=True)
        if attr == "weight":
            if self.scheme.bits == 4 and self.stored.packing != INT4_PACKING:
                value = pack_pairs_to_halves(value, module.group_size)
            module.weight = nn.Parameter(value, requires_grad=False)
        else:
            setattr(module, attr, value)

    def place_thudm(self, name: str, module: QuantizedWeight, attr: str, tensor: torch.Tensor) -> None:
        bits = self.scheme.bits
        self.check_dtype(name, tensor, torch.int8 if attr == "weight" else torch.float16)
        value = tensor.to(device=self.device, copy=True)
        if attr == "weight":
            # signed nibbles -> offset binary (q + 8): flip the top bit of both nibbles
            value = value if bits == 8 else pack_pairs_to_halves(value.view(torch.uint8) ^ 0x88, module.group_size)
            module.weight = nn.Parameter(value, requires_grad=False)
            return
        scale = value.to(torch.float16)
        if bits == 4:  # one scale per row -> the same scale for each group, zero point 8
            groups = module.weight_scale.shape[1]
            scale = scale[:, None].expand(-1, groups).contiguous()
            module.weight_zero = torch.full_like(scale, 8, dtype=torch.uint8)
        module.weight_scale = scale


def quantized_skeleton(config: ChatGLMConfig, scheme: QuantScheme, *, dtype: torch.dtype | None = None
                       ) -> tuple[ChatGLMForConditionalGeneration, set[str]]:
    """The model on meta with its quantized modules swapped in, and the names of those modules; `dtype`:
    the float parameters' dtype (set before the swap, so the scales stay float16)."""
    from .api import model_class

    model = model_class(config)(config, device="meta")
    if dtype is not None:
        model = model.to(dtype)
    return model, set(swap_modules(model, scheme))


def finish_loading(model: ChatGLMForConditionalGeneration, scheme: QuantScheme, *, dtype: torch.dtype,
                   device: torch.device, source: str) -> None:
    """After every tensor is placed: share a tied lm_head's quantized storage, rebuild buffers, check."""
    if scheme.embeddings:
        if model.lm_head.weight is model.transformer.word_embeddings.weight:
            tie_quantized_lm_head(model)  # load_weights tied the weight only
    if isinstance(model.transformer.word_embeddings, (QuantizedEmbedding, HalfStoredEmbedding)):
        model.transformer.word_embeddings.dtype_carrier = torch.empty(0, dtype=dtype, device=device)
    model.reset_buffers()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: {left[0]} was not loaded")
    model.config.quantization = record_group_sizes(model, scheme.config_entry(lm_head_tied=model.lm_head_tied))


def load_quantized(
    path: Path,
    config: ChatGLMConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quantize: "str | dict | QuantScheme | None" = None,
    float16_embeddings: bool | None = None,
) -> ChatGLMForConditionalGeneration:
    """Build the quantized model on meta and fill it shard by shard: a float checkpoint is quantized
    tensor by tensor on `device`; a pre-quantized one (ours or THUDM's) is placed as stored.

    `float16_embeddings`: keep word_embeddings and lm_head (unless quantized) in float16, computed in
    `dtype`; None (default): on the CPU in float32, where that is about 1 GB less for the 6B models and half
    the lm_head's bytes per token. Saved checkpoints are the same either way (they store these in float16)."""
    path = Path(path)
    source = str(path)
    stored = stored_format(config, source)
    scheme = resolve_scheme(stored, QuantScheme.parse(quantize))
    config.quantization_bit = 0  # the loaded model holds our format; THUDM's code path is not involved
    model, quantized = quantized_skeleton(config, scheme)
    if keeps_float16_embeddings(scheme, float16_embeddings, device=device, dtype=dtype):
        store_float16_embeddings(model)
    place = Placer(model, scheme, stored, dtype=dtype, device=device, source=source)
    load_weights(model, path, dtype=dtype, device=device, expected=checkpoint_shapes(config, stored, quantized), place=place)
    finish_loading(model, scheme, dtype=dtype, device=device, source=source)
    return model


# -- saving --------------------------------------------------------------------------------------
def save_quantized(model: ChatGLMForConditionalGeneration, out: Path, *, tokenizer_dir: Path | None) -> None:
    """Write a pre-quantized checkpoint (safetensors + index + config with the scheme + tokenizer)."""
    if not model.config.quantization:
        raise ChatGLMError("save_quantized needs a quantized model (load it with quantize='int8' or 'int4')")
    tied = model.lm_head_tied
    state = {}
    for name, tensor in model.state_dict().items():
        if tied and name.startswith("lm_head."):
            continue  # a tied lm_head is the embeddings: loading ties it again
        state[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    # THUDM's code must refuse this folder rather than load it wrongly (it would take the int8 tensors as
    # float weights and ignore the scales): no auto_map and no *.py, so trust_remote_code finds no code, and
    # an architecture name no code knows, so a config.json edited by hand still does not load it.
    extra = {k: v for k, v in model.config.extra.items() if k != "auto_map"}
    extra["architectures"] = [OWN_FORMAT_ARCHITECTURE]
    config = replace(model.config, quantization_bit=0, torch_dtype="float16", extra=extra,
                     quantization={**model.config.quantization, "lm_head_tied": tied})
    save_checkpoint(state, config, Path(out), tokenizer_dir=tokenizer_dir, copy_code=False)


# -- THUDM's own format (quantization_bit), for THUDM's loading code -------------------------------
def thudm_quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC.md section 7: symmetric per output row, scale = max|w| / (2**(bits-1) - 1) in float16,
    q = round(w / scale); int4 packs column 2j in the high nibble of byte j (signed nibbles)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).to(torch.float16)
    divisor = torch.where(scale == 0, 1.0, scale.float())
    limit = 2 ** (bits - 1) - 1
    q = (w / divisor[:, None]).round().clamp(-limit, limit).to(torch.int8)
    if bits == 4:
        q = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.int8)
    return q, scale


def save_thudm(model: ChatGLMForConditionalGeneration, out: Path, *, bits: int, tokenizer_dir: Path | None) -> None:
    """Write `model` (a float model) as THUDM's chatglm-6b-int8/int4 layout (chatglm2/3-6b-int4 alike): every Linear inside the layers as
    int8 `weight` + float16 `weight_scale` [out] (int4: per channel, any width), the rest float16, config.json
    with `quantization_bit`, THUDM's *.py and `auto_map` kept, so both THUDM's code and chatglm-ft load it."""
    if model.config.quantization or model.config.quantization_bit:
        raise ChatGLMError("--format thudm needs a float source checkpoint; pass the float16 checkpoint as --model")
    if bits not in (4, 8):
        raise ChatGLMError(f"quantization bits must be 4 or 8, not {bits}")
    state = {}
    for name, tensor in model.state_dict().items():
        module_name = name.removesuffix(".weight")
        # the layers' Linears: transformer.layers.N (ChatGLM-6B) or transformer.encoder.layers.N (ChatGLM2/3, SPEC II.8)
        if name.startswith(("transformer.layers.", "transformer.encoder.layers.")) and name.endswith(".weight") \
                and type(model.get_submodule(module_name)) is nn.Linear:
            state[name], state[module_name + ".weight_scale"] = thudm_quantize_weight(tensor, bits)
        else:
            state[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    config = replace(model.config, quantization_bit=bits, quantization=None, torch_dtype="float16")
    save_checkpoint(state, config, Path(out), tokenizer_dir=tokenizer_dir)
