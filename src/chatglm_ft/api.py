"""`load()`: the one entry point that turns a checkpoint directory into (model, tokenizer)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import expected_shapes, load_weights
from .config import ChatGLMConfig, load_config
from .config_glm2 import ChatGLM2Config
from .errors import ChatGLMError
from .model import ChatGLMForConditionalGeneration
from .multigpu import parse_devices, split_layers
from .tokenizer import ChatGLMTokenizer
from . import tokenizers

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


def model_class(config: ChatGLMConfig | ChatGLM2Config) -> type:
    """The network of the config's ChatGLM generation (model.py or its sibling model_glm2.py)."""
    if isinstance(config, ChatGLM2Config):
        from .model_glm2 import ChatGLM2ForConditionalGeneration

        return ChatGLM2ForConditionalGeneration
    return ChatGLMForConditionalGeneration


def build_model(config: ChatGLMConfig | ChatGLM2Config, *, dtype: torch.dtype, device: torch.device | str):
    """A model with random weights (tests, benchmarks, training from scratch), initialised like the original."""
    model = model_class(config)(config, device=device)
    model.to(dtype)
    return model


def load(
    path: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | dict | None = None,  # "int8", "int4" or {"bits": 4, "group_size": 128, "embeddings": True}
    adapter: str | Path | list | None = None,
    ptuning: str | Path | None = None,
    parse_special: bool = False,  # literal "<eop>", "[MASK]"... in text become control tokens, as in THUDM's tokenizer
    float16_embeddings: bool | None = None,  # quantized: keep embeddings and lm_head in float16 (default: on the CPU)
) -> tuple[ChatGLMForConditionalGeneration, ChatGLMTokenizer]:
    """Load a ChatGLM-6B, ChatGLM2-6B or ChatGLM3-6B checkpoint directory (config.json tells which):
    `model, tokenizer = load(path, dtype="float16", device="cuda")`.

    `device="cuda:0,cuda:1"` spreads the layers over several GPUs (multigpu.py). `ptuning` is a P-Tuning v2
    prefix directory in THUDM's layout (ptuning.py); one passed in `adapter` is recognised too.
    A quantized model on the CPU in float32 keeps word_embeddings and lm_head in float16, as checkpoints
    store them (half their memory, the same results); `float16_embeddings=False` widens them to float32."""
    adapter, ptuning = split_prefix(adapter, ptuning)
    path = model_path(path)
    config = load_config(path)
    tokenizer = load_tokenizer(path, config)
    tokenizer.parse_special = parse_special
    model = load_model(path, config, dtype=dtype, device=device, quantize=quantize, adapter=adapter, ptuning=ptuning,
                       float16_embeddings=float16_embeddings)
    return model, tokenizer


def load_tokenizer(path: Path, config: ChatGLMConfig | ChatGLM2Config):
    """The tokenizer of the config's ChatGLM generation, checked against the model's vocabulary."""
    # One rule for the generation: the config's (ChatGLM-6B's config has no family field).
    tokenizer = tokenizers.load_tokenizer(path, family=getattr(config, "family", "chatglm"))
    tokenizer.check_model(config.vocab_size)
    return tokenizer


def load_model(
    path: str | Path | None = None,
    config: ChatGLMConfig | ChatGLM2Config | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | dict | None = None,
    adapter: str | Path | list | None = None,
    ptuning: str | Path | None = None,
    float16_embeddings: bool | None = None,
):
    """The network of a checkpoint directory, without its tokenizer (arguments as `load`)."""
    path = model_path(path)
    config = config or load_config(path)
    devices = parse_devices(device)  # "cuda:0,cuda:1": layers spread over several devices
    device = devices[0] if devices else resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    quantized = bool(config.quantization_bit or config.quantization or quantize)
    if float16_embeddings and not quantized:
        raise ChatGLMError("float16_embeddings applies to quantized models; pass quantize='int8' or 'int4'")
    # a split float model is assembled in host memory (it does not fit one of the cards by assumption);
    # a quantized one is small enough to be quantized on the first card, as usual
    load_device = torch.device("cpu") if devices and not quantized else device
    if quantized:
        from .quantize import load_quantized

        model = load_quantized(path, config, dtype=dtype, device=load_device, quantize=quantize,
                               float16_embeddings=float16_embeddings)
    else:
        model = model_class(config)(config, device="meta")
        load_weights(model, path, dtype=dtype, device=load_device, expected=expected_shapes(config))
        model.reset_buffers()
    if devices:
        split_layers(model, devices)
    model.eval()
    if ptuning:
        from .ptuning import load_prefix

        load_prefix(model, ptuning)
    if adapter:
        from .lora import apply_adapters

        model = apply_adapters(model, adapter)
    return model



def split_prefix(adapter: str | Path | list | None, ptuning: str | Path | None) -> tuple[list, str | Path | None]:
    """Move a P-Tuning directory given among the adapters to `ptuning` (at most one prefix per model)."""
    from .ptuning import is_prefix_dir, prefix_dir

    adapters = [adapter] if isinstance(adapter, (str, Path)) else list(adapter or [])
    prefixes = [a for a in adapters if Path(a).expanduser().is_dir() and is_prefix_dir(prefix_dir(a))]
    if ptuning is not None:
        prefixes.insert(0, ptuning)
    if len(prefixes) > 1:
        raise ChatGLMError(f"two P-Tuning prefixes given ({prefixes[0]}, {prefixes[1]}); a model takes one")
    return [a for a in adapters if a not in prefixes], (prefixes[0] if prefixes else None)
