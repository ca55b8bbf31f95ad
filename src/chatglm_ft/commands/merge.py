"""`chatglm-ft merge`: fold LoRA adapters into the base weights and write a full checkpoint in the
original layout (safetensors shards + index, config.json, tokenizer files) that any ChatGLM-6B,
ChatGLM2-6B or ChatGLM3-6B loader reads (the base's generation)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into the model and save a full checkpoint",
                       description="Merge one or more LoRA adapters (PEFT layout) into a ChatGLM-6B, ChatGLM2-6B or ChatGLM3-6B checkpoint and "
                                   "write the result to --out in the original layout.")
    p.add_argument("--model", help="base checkpoint directory (default: $CHATGLM_FT_MODEL)")
    p.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="LoRA adapter directory, or a `chatglm-ft train` output directory (repeatable: adapters add up)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="new or empty directory for the merged checkpoint (an earlier merge output needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier merge output")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the saved weights (auto: the base checkpoint's torch_dtype)")
    p.add_argument("--device", default="cpu", help="where to merge (cpu needs host memory for one copy of the model)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..api import load, model_path
    from ..checkpoint import save_model
    from ..config import load_config
    from ..errors import ChatGLMError
    from ..lora import merge_adapter
    from ..outputs import check_output_dir

    from ..ptuning import is_prefix_dir, prefix_dir

    for adapter in args.adapter:
        if Path(adapter).expanduser().is_dir() and is_prefix_dir(prefix_dir(adapter)):
            raise ChatGLMError(f"{adapter} is a P-Tuning prefix, which cannot be merged: it adds keys and values to"
                               " every layer's attention instead of changing weights; use it with --ptuning DIR")
    source = model_path(args.model)
    config = load_config(source)
    if config.quantization_bit or config.quantization:
        raise ChatGLMError(f"{source} is quantized; merge into the float16 checkpoint, then quantize the result")
    out = check_output_dir(args.out, command="merge", overwrite=args.overwrite,
                           sources=[("--model", source)] + [("--adapter", a) for a in args.adapter])
    dtype = config.torch_dtype if args.dtype == "auto" else args.dtype
    start = time.perf_counter()
    model, _ = load(source, dtype=dtype, device=args.device, adapter=args.adapter)
    model = merge_adapter(model)
    save_model(model, out, tokenizer_dir=source, dtype=model.dtype)
    print(f"merged {len(args.adapter)} adapter(s) into {source} -> {out} ({dtype}) in {time.perf_counter() - start:.1f}s",
          file=sys.stderr)
    return 0
