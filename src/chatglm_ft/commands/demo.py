"""`chatglm-ft demo`: build a tiny ChatGLM, show it fail, LoRA-train it, show it succeed; CPU, no downloads."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="LoRA fine-tuning end to end on a tiny generated model (CPU, about 40 s on two cores, nothing downloaded)",
        description="Generate a bilingual translation task, a sentencepiece tokenizer and a tiny model of the ChatGLM-6B "
                    "architecture; measure exact match on held-out questions, LoRA-train with the same code as "
                    "`chatglm-ft train`, reload base + adapter from disk and measure again. Writes OUT/base (checkpoint), "
                    "OUT/adapter (PEFT layout) and OUT/data, and prints the commands for the real ChatGLM-6B.")
    p.add_argument("--out", default="demo-out", metavar="DIR",
                   help="new or empty output directory (default: demo-out; an earlier demo output needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it holds an earlier demo output (removed once the new demo completes)")
    p.add_argument("--seed", type=int, default=0, help="seed for the data split, weights and training (default: 0)")
    p.add_argument("--steps", type=int, default=300, help="LoRA training steps (default: 300)")
    p.add_argument("--base-steps", type=int, default=300,
                   help="steps of the base model's warm-up pre-training (default: 300)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu; the model is tiny)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default: 1; the model is so small that more threads rarely help)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from ..errors import ChatGLMError

    if args.steps < 1 or args.base_steps < 1 or args.threads < 1:
        raise ChatGLMError("--steps, --base-steps and --threads must be at least 1")
    missing = [name for name in ("peft", "tqdm") if importlib.util.find_spec(name) is None]
    if missing:
        raise ChatGLMError(f"the demo trains a LoRA adapter and needs {', '.join(missing)}: pip install 'chatglm-ft[train]'")
    from ..demo import run_demo
    from ..outputs import check_output_dir, discard, move_aside

    out = check_output_dir(args.out, command="demo", overwrite=args.overwrite)
    aside = move_aside(out) if out.exists() and any(out.iterdir()) else None
    run_demo(out=args.out, seed=args.seed, steps=args.steps, base_steps=args.base_steps, device=args.device,
             threads=args.threads)
    discard(aside)
    return 0
