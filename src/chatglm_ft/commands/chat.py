"""`chatglm-ft chat`: the interactive terminal chat of the original cli_demo, streamed."""
from __future__ import annotations

import argparse
import sys

from .options import add_compile_arg, add_generation_args, add_model_args, generation_config, load_from_args

WELCOME = "ChatGLM-6B chat. Type to talk; 'clear' resets the history, 'stop' or 'exit' (or Ctrl-D) leaves, Ctrl-C interrupts an answer."


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive terminal chat with streaming and history",
                       description=WELCOME)
    add_model_args(p)
    add_generation_args(p, max_new_tokens=None)
    add_compile_arg(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..chat import ResponseStreamer
    from ..errors import ChatGLMError
    from ..generate import stream_text
    from ..prompt import chat_prompt

    if args.max_length is None and args.max_new_tokens is None:
        args.max_length = 2048  # the original chat's default: prompt + answer
    gen = generation_config(args)
    model, tokenizer = load_from_args(args)
    history: list[tuple[str, str]] = []
    print(WELCOME)
    while True:
        try:
            query = input("\nUser: ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(type 'exit' or press Ctrl-D to leave)")
            continue
        command = query.strip().lower()
        if command in ("stop", "exit", "quit"):
            return 0
        if command == "clear":
            history = []
            print("(history cleared)")
            continue
        if not query.strip():
            continue
        ids = tokenizer.encode(chat_prompt(query, history))
        streamer = ResponseStreamer()
        sys.stdout.write("\nChatGLM-6B: ")
        try:
            for _, result in stream_text(model, tokenizer, ids, gen):
                sys.stdout.write(streamer.update(result.text))
                sys.stdout.flush()
            sys.stdout.write(streamer.finish())
        except KeyboardInterrupt:
            sys.stdout.write(streamer.finish() + " [interrupted]")
        except ChatGLMError as e:  # e.g. the history grew past the context: say so, keep the session
            print(f"\n(error: {e})")
            continue
        print()
        history.append((query, streamer.response))
