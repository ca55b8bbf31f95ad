"""`chatglm-ft generate`: one prompt in, text out (scriptable, `--json`)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

from .options import add_compile_arg, add_generation_args, add_model_args, generation_config, load_from_args


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt",
                       description="Generate a continuation of --prompt (or stdin). The prompt is used as is, "
                                   "followed by [gMASK]<sop>; --chat wraps it in the chat format first.")
    add_model_args(p)
    p.add_argument("--prompt", help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="apply the chat template (no history)")
    p.add_argument("--system", default=None, help="with --chat: system prompt (ChatGLM3-6B)")
    p.add_argument("--tools", default=None, metavar="FILE",
                   help="with --chat: JSON file with a list of tool descriptions (ChatGLM3-6B)")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, finish_reason, ...")
    add_generation_args(p)
    add_compile_arg(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ChatGLMError
    from ..generate import stream_text
    from ..chat_format import chat_format_for
    from .chat import _read_tools

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ChatGLMError("empty prompt; pass --prompt TEXT or pipe text on stdin")
    if (args.system or args.tools) and not args.chat:
        raise ChatGLMError("--system and --tools shape a chat prompt; add --chat")
    tools = _read_tools(args.tools)
    gen = generation_config(args)
    model, tokenizer = load_from_args(args)
    fmt = chat_format_for(tokenizer)  # the model family's chat prompt and clean-up, for --chat
    history = fmt.new_history(system=args.system, tools=tools) if args.chat else None
    ids = fmt.prompt_ids(prompt, history) if args.chat else tokenizer.encode(prompt)
    if args.chat:
        gen = replace(gen, stop_token_ids=fmt.stop_token_ids)
    start = time.perf_counter()
    result = None
    for delta, result in stream_text(model, tokenizer, ids, gen):
        if not args.json and delta:
            sys.stdout.write(delta)
            sys.stdout.flush()
    seconds = time.perf_counter() - start
    text = fmt.clean(fmt.output_text(result.token_ids, result.text, result.finish_reason)) if args.chat else result.text
    n = len(result.token_ids)
    if args.json:
        print(json.dumps({
            "text": text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
            "prompt_tokens": len(ids), "completion_tokens": n, "seconds": round(seconds, 4),
            "tokens_per_second": round(n / seconds, 2) if seconds > 0 else None,
        }, ensure_ascii=False))
    else:
        print()
        print(f"[{n} tokens in {seconds:.2f}s, {n / max(seconds, 1e-9):.1f} tokens/s, {result.finish_reason}]", file=sys.stderr)
    return 0
