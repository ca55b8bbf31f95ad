"""`chatglm-ft chat`: the interactive terminal chat of the original cli_demo, streamed."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .options import add_compile_arg, add_generation_args, add_model_args, generation_config, load_from_args

WELCOME = "{name} chat. Type to talk; 'clear' resets the history, 'stop' or 'exit' (or Ctrl-D) leaves, Ctrl-C interrupts an answer."
TOOLS_HELP = ("A tool call is shown as JSON; type the tool's result (usually JSON) at the Observation prompt, or an empty"
              " line to skip it.")


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive terminal chat with streaming and history",
                       description=WELCOME.format(name="ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B"))
    add_model_args(p)
    add_generation_args(p, max_new_tokens=None)
    add_compile_arg(p)
    p.add_argument("--system", default=None, help="system prompt (ChatGLM3-6B)")
    p.add_argument("--tools", default=None, metavar="FILE",
                   help="JSON file with a list of tool descriptions (name, description, parameters) (ChatGLM3-6B)")
    p.set_defaults(handler=run)


def _read_tools(path: str | None) -> list | None:
    import json
    from pathlib import Path

    from ..errors import ChatGLMError

    if path is None:
        return None
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ChatGLMError(f"--tools {path}: cannot read a JSON list of tools ({e})")
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "name" in t for t in tools):
        raise ChatGLMError(f"--tools {path}: must be a JSON list of objects with a name, description and parameters")
    return [t.get("function", t) if t.get("type") == "function" else t for t in tools]  # OpenAI style too


def run(args: argparse.Namespace) -> int:
    import json

    from ..chat import ResponseStreamer
    from ..chat_format import chat_format_for
    from ..errors import ChatGLMError
    from ..generate import stream_text

    tools = _read_tools(args.tools)
    model, tokenizer = load_from_args(args)
    fmt = chat_format_for(tokenizer)
    if args.max_length is None and args.max_new_tokens is None:
        args.max_length = fmt.max_length  # the original chat's default: prompt + answer
    gen = replace(generation_config(args), stop_token_ids=fmt.stop_token_ids)
    new_history = lambda: fmt.new_history(system=args.system, tools=tools)  # noqa: E731
    history = new_history()
    print(WELCOME.format(name=fmt.display_name) + (" " + TOOLS_HELP if tools else ""))
    query, role = None, "user"
    while True:
        if query is None:
            try:
                query = input("\nObservation: " if role == "observation" else "\nUser: ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print("\n(type 'exit' or press Ctrl-D to leave)")
                query, role = None, "user"
                continue
            command = query.strip().lower()
            if command in ("stop", "exit", "quit"):
                return 0
            if command == "clear":
                history, query, role = new_history(), None, "user"
                print("(history cleared)")
                continue
            if not query.strip():
                query, role = None, "user"
                continue
        ids = fmt.prompt_ids(query, history, role=role)
        streamer = ResponseStreamer(fmt.clean)
        sys.stdout.write(f"\n{fmt.display_name}: ")
        result = None
        try:
            for _, result in stream_text(model, tokenizer, ids, gen):
                sys.stdout.write(streamer.update(result.text))
                sys.stdout.flush()
            sys.stdout.write(streamer.finish())
        except KeyboardInterrupt:
            sys.stdout.write(streamer.finish() + " [interrupted]")
        except ChatGLMError as e:  # e.g. the history grew past the context: say so, keep the session
            print(f"\n(error: {e})")
            query, role = None, "user"
            continue
        output = fmt.output_text(result.token_ids, result.text, result.finish_reason) if result else ""
        response, history = fmt.process_response(output, query, history, role=role)
        query, role = None, "user"
        if isinstance(response, str):
            sys.stdout.write(streamer.final(response))
        else:  # ChatGLM3 called a tool: show the call, ask for its result
            sys.stdout.write(json.dumps(response, ensure_ascii=False))
            role = "observation" if "parameters" in response else "user"
        print()
