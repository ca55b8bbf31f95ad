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
    g.add_argument("--temperature", type=float, default=0.95 if sample_default else 0.0,
                   help="sampling temperature; 0 means greedy")
    g.add_argument("--top-p", type=float, default=0.7, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--truncate", action="store_true", help="cut too-long prompts from the left instead of refusing")


def generation_config(args: argparse.Namespace):
    from ..generate import GenerationConfig

    greedy = args.temperature == 0
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens if args.max_length is None else None,
        max_length=args.max_length,
        do_sample=not greedy,
        temperature=args.temperature if not greedy else 1.0,
        top_p=args.top_p,
        top_k=args.top_k,
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
    return model, tokenizer
