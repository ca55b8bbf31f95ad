"""Flags shared by several commands, and turning them into library calls."""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, *, adapter: bool = True, quantize: bool = True,
                   ptuning: bool | None = None) -> None:
    p.add_argument("--model", help="ChatGLM-6B checkpoint directory (default: $CHATGLM_FT_MODEL)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype (auto: float16 on GPU, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or a list such as cuda:0,cuda:1 to spread the layers over several GPUs (auto: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for inference (default: PyTorch's, one per physical core)")
    if quantize:
        p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                       help="weight-only quantization applied while loading")
        p.add_argument("--quantize-embeddings", action="store_true",
                       help="with --quantize: also quantize word_embeddings and lm_head (less memory, some accuracy)")
    p.add_argument("--parse-special-tokens", action="store_true",
                   help="treat <sop> <eop> [MASK] <pad> <unk> typed in text as control tokens, as THUDM's tokenizer"
                        " does (default: they stay plain text)")
    if adapter:
        p.add_argument("--adapter", action="append", default=None, metavar="DIR",
                       help="LoRA adapter directory (PEFT layout) applied unmerged")
    if adapter if ptuning is None else ptuning:
        p.add_argument("--ptuning", default=None, metavar="DIR",
                       help="P-Tuning v2 prefix directory (THUDM's layout: config.json with pre_seq_len + "
                            "pytorch_model.bin)" + ("; a prefix given to --adapter is recognised too" if adapter else ""))


def add_generation_args(p: argparse.ArgumentParser, *, max_new_tokens: int | None = 256, sample_default: bool = True) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="new tokens at most")
    g.add_argument("--max-length", type=int, default=None, help="prompt + new tokens at most (as in the original chat)")
    from ..generation_config import CHAT_TEMPERATURE, CHAT_TOP_P

    g.add_argument("--temperature", type=float, default=CHAT_TEMPERATURE if sample_default else 0.0,
                   help="sampling temperature; 0 means greedy")
    g.add_argument("--top-p", type=float, default=CHAT_TOP_P, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="keep tokens at least this fraction as likely as the most likely one (0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--truncate", action="store_true", help="cut too-long prompts from the left instead of refusing")


COMPILE_HELP = ("decoding: auto (compiled step + CUDA graphs on one GPU, eager elsewhere), off (eager: nothing compiled"
                " or captured), graphs (CUDA graphs without compiling), on (compiled; also on the CPU)")
PREFILL_GRAPHS_HELP = ("with CUDA graphs (--compile auto/graphs/on on a GPU): also run the prefill of prompts up to"
                       " 512 tokens as CUDA graphs, padded to a length bucket (default; --no-prefill-graphs: eager)")
# A/B switches of the inference kernels, read here (the CLI layer) only; the library takes KernelOptions.
KERNEL_ENV = {"gemv": "CHATGLM_FT_GEMV", "fused": "CHATGLM_FT_FUSED", "decode_attention": "CHATGLM_FT_DECODE_ATTENTION",
              "new_kernels": "CHATGLM_FT_NEW_KERNELS", "quantized_rows": "CHATGLM_FT_QUANT_GEMV_ROWS",
              "float_rows": "CHATGLM_FT_GEMV_ROWS"}


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", choices=["auto", "off", "graphs", "on"], default="auto", help=COMPILE_HELP)
    p.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=True, help=PREFILL_GRAPHS_HELP)


def kernel_options(environ=None):
    """KernelOptions from $CHATGLM_FT_GEMV (kernel|cublas|triton), $CHATGLM_FT_FUSED (1|0),
    $CHATGLM_FT_DECODE_ATTENTION (triton|torch), $CHATGLM_FT_NEW_KERNELS (1|0), $CHATGLM_FT_QUANT_GEMV_ROWS
    and $CHATGLM_FT_GEMV_ROWS (N): switches for A/B measurements, defaults otherwise."""
    import os

    from ..options import KernelOptions

    env = os.environ if environ is None else environ
    values = {}
    for field, name in KERNEL_ENV.items():
        value = env.get(name, "").strip().lower()
        if not value:
            continue
        if field in ("fused", "new_kernels"):
            values[field] = value not in ("0", "false", "off", "no")
        elif field in ("quantized_rows", "float_rows"):
            try:
                values[field] = int(value)
            except ValueError:
                from ..errors import ChatGLMError

                raise ChatGLMError(f"{name}={env.get(name)}: expected a number of token rows, e.g. 16") from None
        else:
            values[field] = value
    try:
        return KernelOptions(**values).validate()
    except Exception as e:  # a ChatGLMError naming the field: say which variable it came from
        from ..errors import ChatGLMError

        raise ChatGLMError(f"{', '.join(f'{n}={env.get(n)}' for n in KERNEL_ENV.values() if env.get(n))}: {e}") from None


def configure_kernel_launch(environ=None) -> None:
    """$CHATGLM_FT_PDL=0 (no programmatic dependent launch) and $CHATGLM_FT_GEMV_CONFIGS=FILE (tile sizes from
    gpu/gemv_sweep.py) for the Triton kernels; nothing is imported when neither is set."""
    import os

    env = os.environ if environ is None else environ
    pdl = env.get("CHATGLM_FT_PDL", "").strip().lower()
    configs = env.get("CHATGLM_FT_GEMV_CONFIGS") or None
    if not (pdl or configs):
        return
    from .. import ops

    if ops.TRITON:
        from .. import kernels

        kernels.configure(pdl=pdl not in ("0", "false", "off", "no") if pdl else None, gemv_configs=configs)


def configure_model(model, args: argparse.Namespace):
    """The model with the kernel choice (environment switches) and the --compile choice applied."""
    from ..options import DecodeOptions

    configure_kernel_launch()
    model.use_kernels(kernel_options())
    model.decode_options = DecodeOptions(compile=getattr(args, "compile", "auto"),
                                         prefill_graphs=getattr(args, "prefill_graphs", True)).validate()
    return model


def generation_config(args: argparse.Namespace):
    from ..generation_config import GenerationConfig

    greedy = args.temperature == 0
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens if args.max_length is None else None,
        max_length=args.max_length,
        do_sample=not greedy,
        temperature=args.temperature if not greedy else 1.0,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_strings=tuple(args.stop),
        truncate_prompt=args.truncate,
    ).validate()


def quantize_from_args(args: argparse.Namespace) -> str | dict | None:
    """The `quantize=` argument of `api.load` for --quantize / --quantize-embeddings."""
    quantize = getattr(args, "quantize", None)
    if not getattr(args, "quantize_embeddings", False):
        return quantize
    if quantize is None:
        from ..errors import ChatGLMError

        raise ChatGLMError("--quantize-embeddings needs --quantize int8 or int4")
    return {"bits": 8 if quantize == "int8" else 4, "embeddings": True}


def apply_threads(args: argparse.Namespace) -> None:
    """--threads: the intra-op threads CPU matmuls and the quantized kernels split their rows over."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        from ..errors import ChatGLMError

        raise ChatGLMError(f"--threads must be at least 1, not {threads}")
    import torch

    torch.set_num_threads(threads)


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer) for the model flags, reporting load time and memory on stderr."""
    import sys
    import time

    from ..api import load

    apply_threads(args)
    start = time.perf_counter()
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device,
                            quantize=quantize_from_args(args), adapter=getattr(args, "adapter", None),
                            ptuning=getattr(args, "ptuning", None),
                            parse_special=getattr(args, "parse_special_tokens", False))
    print(f"loaded in {time.perf_counter() - start:.1f}s on {model.device} ({model.dtype})", file=sys.stderr)
    return configure_model(model, args), tokenizer
