"""Kernel and decode choices as plain options (torch-free): passed in explicitly, never read from the
environment inside the package. The CLI builds them from its flags (commands/options.py)."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ChatGLMError

GEMV_CHOICES = ("kernel", "cublas", "triton")
ATTENTION_CHOICES = ("triton", "torch")
COMPILE_MODES = ("auto", "off", "graphs", "on")


@dataclass(frozen=True)
class KernelOptions:
    """Which kernels a model's layers use for inference on CUDA (ops.py is the one gate; float and
    quantized layers alike). Training and CPU runs use plain PyTorch whatever these say."""

    # Matmuls of a few token rows: "kernel" our Triton skinny matmul (kernels.py), "cublas" cuBLAS
    # (dequantize + cuBLAS for int8/int4 layers), "triton" cuBLAS in eager code and inductor's tuned
    # reductions in compiled code (docs/benchmarks.md has the comparison).
    gemv: str = "kernel"
    fused: bool = True  # fused eager paths: rotary, norm (+ residual) and SwiGLU kernels, GELU in the matmul's epilogue
    decode_attention: str = "triton"  # one-token attention: the flash-decoding kernel or "torch"
    # The kernels added after the first GPU measurements: the grouped-KV decode attention (ChatGLM2/3),
    # RMSNorm (+ residual), ChatGLM-6B's residual + LayerNorm, SwiGLU and ChatGLM2/3's pair rotary. On since
    # measured on an H100 (ChatGLM3-6B: decode 199 -> 205 tokens/s, 2048-token prefill 53.9 -> 42.0 ms); off
    # for A/B runs ($CHATGLM_FT_NEW_KERNELS=0).
    new_kernels: bool = True
    # Token rows up to which int8/int4 layers run the integer kernel (its tall tiles above 32 rows); more
    # rows dequantize the layer to float16 for cuBLAS. 128 since measured on an H100 (ChatGLM-6B engines, 128
    # streams: int8 6,415 -> 7,560 and int4 5,061 -> 7,507 tokens/s against 16; docs/benchmarks.md); A/B
    # runs set it with $CHATGLM_FT_QUANT_GEMV_ROWS.
    quantized_rows: int = 128
    # The same for float16/bfloat16 layers: up to 16 rows the skinny kernel beats cuBLAS (measured); more rows
    # (a serving step's 17-128, a short prefill) take its tall tiles, 64-128 rows a program, for measuring them
    # against cuBLAS ($CHATGLM_FT_GEMV_ROWS).
    float_rows: int = 16

    def validate(self) -> "KernelOptions":
        for name in ("quantized_rows", "float_rows"):
            if not 1 <= getattr(self, name) <= 4096:
                raise ChatGLMError(f"{name} must be from 1 to 4096, got {getattr(self, name)}")
        if self.gemv not in GEMV_CHOICES:
            raise ChatGLMError(f"gemv must be one of {', '.join(GEMV_CHOICES)}, got {self.gemv!r}")
        if self.decode_attention not in ATTENTION_CHOICES:
            raise ChatGLMError(f"decode attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.decode_attention!r}")
        return self


@dataclass(frozen=True)
class DecodeOptions:
    """How decoding runs: `compile` "auto" (compiled step + CUDA graphs on one GPU, eager elsewhere),
    "off" (eager), "graphs" (CUDA graphs of the uncompiled step) or "on" (compiled; CUDA graphs on a GPU)."""

    compile: str = "auto"
    compile_prefill: bool = False  # also compile the prefill of single prompts (dynamic length)
    # where the decode step is a CUDA graph, short prompts' prefill is one too (padded to a length bucket,
    # fast.py; ChatGLM3-6B on an H100: 128 tokens 18.9 -> 6.3 ms); --no-prefill-graphs prefills eagerly
    prefill_graphs: bool = True

    def validate(self) -> "DecodeOptions":
        if self.compile not in COMPILE_MODES:
            raise ChatGLMError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        return self
