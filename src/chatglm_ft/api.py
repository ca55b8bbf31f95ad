"""`load()`: the one entry point that turns a checkpoint directory into (model, tokenizer)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import expected_shapes, load_weights
from .config import ChatGLMConfig
from .errors import ChatGLMError
from .model import ChatGLMForConditionalGeneration
from .multigpu import parse_devices, split_layers
from .tokenizer import ChatGLMTokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ChatGLMError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ChatGLMError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        # float16 halves memory on a GPU; CPUs compute float16 slowly and imprecisely.
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ChatGLMError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return DTYPES[dtype]


def model_path(path: str | Path | None) -> Path:
    """The checkpoint path from the argument or $CHATGLM_FT_MODEL."""
    path = path or os.environ.get("CHATGLM_FT_MODEL")
    if not path:
        raise ChatGLMError("no model given; pass --model DIR or set CHATGLM_FT_MODEL to a ChatGLM-6B checkpoint directory")
    return Path(path).expanduser()


def build_model(config: ChatGLMConfig, *, dtype: torch.dtype, device: torch.device | str) -> ChatGLMForConditionalGeneration:
    """A model with random weights (tests, benchmarks, training from scratch), initialised like the original."""
    model = ChatGLMForConditionalGeneration(config, device=device)
    model.to(dtype)
    return model


def load(
    path: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | dict | None = None,  # "int8", "int4" or {"bits": 4, "group_size": 128, "embeddings": True}
    adapter: str | Path | list | None = None,
    parse_special: bool = False,  # literal "<eop>", "[MASK]"... in text become control tokens, as in THUDM's tokenizer
) -> tuple[ChatGLMForConditionalGeneration, ChatGLMTokenizer]:
    """Load a ChatGLM-6B checkpoint directory: `model, tokenizer = load(path, dtype="float16", device="cuda")`.

    `device="cuda:0,cuda:1"` spreads the layers over several GPUs (multigpu.py)."""
    path = model_path(path)
    config = ChatGLMConfig.from_dir(path)
    tokenizer = ChatGLMTokenizer.from_dir(path)
    tokenizer.parse_special = parse_special
    tokenizer.check_model(config.vocab_size)
    devices = parse_devices(device)  # "cuda:0,cuda:1": layers spread over several devices
    device = devices[0] if devices else resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    quantized = bool(config.quantization_bit or config.quantization or quantize)
    # a split float model is assembled in host memory (it does not fit one of the cards by assumption);
    # a quantized one is small enough to be quantized on the first card, as usual
    load_device = torch.device("cpu") if devices and not quantized else device
    if quantized:
        from .quantize import load_quantized

        model = load_quantized(path, config, dtype=dtype, device=load_device, quantize=quantize)
    else:
        model = ChatGLMForConditionalGeneration(config, device="meta")
        load_weights(model, path, dtype=dtype, device=load_device, expected=expected_shapes(config))
        model.reset_buffers()
    if devices:
        split_layers(model, devices)
    model.eval()
    if adapter:
        from .lora import apply_adapters

        model = apply_adapters(model, adapter)
    return model, tokenizer

