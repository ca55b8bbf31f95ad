"""`chatglm-ft serve`: the OpenAI-compatible API, the original api.py endpoint and a web chat page,
with continuous batching (see server.py and engine.py)."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from .options import COMPILE_HELP, add_model_args, load_from_args

DESCRIPTION = (
    "Serve the model over HTTP: OpenAI-compatible /v1/chat/completions, /v1/completions and /v1/models, the original "
    "ChatGLM-6B api.py format at POST /, a web chat page at GET /, /health and Prometheus /metrics. Requests share the "
    "GPU through continuous batching. Ctrl-C or SIGTERM finishes the requests in flight, then exits."
)


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API server with continuous batching and a web chat page",
                       description=DESCRIPTION)
    add_model_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("CHATGLM_FT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page"
                        " (default: $CHATGLM_FT_API_KEY)")
    s.add_argument("--model-name", default="chatglm-6b", help="the model id clients send and /v1/models lists")
    s.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together (KV-cache slots); each slot holds --max-context tokens")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before new ones get 429")
    s.add_argument("--max-context", type=int, default=None,
                   help="prompt + answer tokens per request (default: the model's max_sequence_length)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted (413 beyond)")
    s.add_argument("--compile", choices=["auto", "off", "graphs", "on"], default="auto",
                   help=COMPILE_HELP + "; the server's step is bucketed (batch and attention length) and, compiled,"
                        " compiles at start: about a minute the first time")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..engine import Engine
    from ..errors import ChatGLMError
    from ..server import create_app, loopback_warning

    if args.max_batch < 1 or args.max_queue < 0:
        raise ChatGLMError("--max-batch must be >= 1 and --max-queue >= 0")
    model, tokenizer = load_from_args(args)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
                    decode=args.compile)
    app = create_app(engine, api_key=args.api_key, model_name=args.model_name, max_body_bytes=args.max_body_bytes)
    warning = loopback_warning(args.host, args.api_key)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"serving {args.model_name} on http://{args.host}:{args.port} ({args.max_batch} slots x {engine.max_context}"
          " tokens); the chat page is at /", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))

    def after_drain(sig, frame):
        # uvicorn handles SIGTERM itself (waits for open requests, then the app's lifespan drains the engine) and
        # re-raises it once done: then exit 0. Before uvicorn listens, SIGTERM ends the process as usual.
        if not server.should_exit:
            raise SystemExit(128 + sig)

    signal.signal(signal.SIGTERM, after_drain)
    server.run()
    return 0
