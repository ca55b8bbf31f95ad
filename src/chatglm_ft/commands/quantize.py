"""`chatglm-ft quantize`: write a pre-quantized INT8/INT4 checkpoint that loads directly."""
from __future__ import annotations

import argparse
import sys
import time


def register(sub) -> None:
    p = sub.add_parser(
        "quantize", help="write an INT8/INT4 checkpoint (safetensors) that loads fast in little memory",
        description="Quantize every Linear inside the layers of --model (a float ChatGLM-6B, ChatGLM2-6B or ChatGLM3-6B checkpoint, or THUDM's "
                    "chatglm-6b-int4/int8 to convert it) and write the result to --out with the scheme recorded in "
                    "config.json. Load it like any checkpoint: chatglm-ft chat --model OUT.")
    p.add_argument("--model", help="source checkpoint directory (default: $CHATGLM_FT_MODEL)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="new or empty output directory (an earlier quantize output needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it holds an earlier quantize output (swapped in once the new one is complete)")
    p.add_argument("--bits", type=int, choices=[4, 8], required=True, help="4 (about 4.0 GB) or 8 (about 6.7 GB)")
    p.add_argument("--group-size", type=int, default=128,
                   help="int4 only: columns sharing one scale and zero point (64: a little more accurate and larger)")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="also quantize word_embeddings and lm_head (saves 0.5-0.8 GB; costs some accuracy)")
    p.add_argument("--format", choices=["chatglm-ft", "thudm"], default="chatglm-ft",
                   help="chatglm-ft: our format (int4 grouped with zero points, loads fast here; THUDM's code refuses it); "
                        "thudm: THUDM's int8/int4 layout (chatglm-6b-int4, chatglm2-6b-int4, ...: per-channel), which THUDM's own code loads too")
    p.add_argument("--device", default="auto",
                   help="where to quantize: cuda is fastest, cpu needs about the output's size in RAM (default: auto)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..api import load, model_path
    from ..errors import ChatGLMError
    from ..outputs import check_output_dir
    from ..quantize import QuantScheme, save_quantized, save_thudm

    source = model_path(args.model)
    out = check_output_dir(args.out, command="quantize", overwrite=args.overwrite, sources=[("--model", source)])
    if args.format == "thudm":
        if args.quantize_embeddings:
            raise ChatGLMError("--format thudm keeps the embeddings in float16; drop --quantize-embeddings")
        start = time.perf_counter()
        model, _ = load(source, dtype="float16", device=args.device)  # the stored weights, as THUDM quantizes them
        save_thudm(model, out, bits=args.bits, tokenizer_dir=source)
        size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
        print(f"wrote {out} in THUDM's int{args.bits} layout in {time.perf_counter() - start:.1f}s"
              f" ({size / 1e9:.2f} GB of weights)", file=sys.stderr)
        return 0
    scheme = QuantScheme(bits=args.bits, group_size=args.group_size, embeddings=args.quantize_embeddings)
    start = time.perf_counter()
    model, _ = load(source, dtype="float16", device=args.device, quantize=scheme)
    print(f"quantized to int{scheme.bits} in {time.perf_counter() - start:.1f}s on {model.device}", file=sys.stderr)
    save_quantized(model, out, tokenizer_dir=source)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    print(f"wrote {out} ({size / 1e9:.2f} GB of weights)", file=sys.stderr)
    return 0
