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
                   help=COMPILE_HELP + "; the server's step is bucketed (batch and attention length). Compiling takes"
                        " about a minute the first time: the server answers meanwhile with the uncompiled step and"
                        " switches when it is done (/health shows decode_step)")
    s.add_argument("--compile-at-start", action="store_true",
                   help="compile the decode step before taking requests, instead of in the background")
    s.add_argument("--allow-host", action="append", default=None, metavar="NAME",
                   help="a Host name clients may use (repeatable; '*' for any). Default: localhost, 127.0.0.1, ::1"
                        " and the --host address; other names get 403, which stops DNS rebinding. Browsers must"
                        " also send a matching Origin")
    s.add_argument("--request-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time a client has to send a whole request, headers and body (default: 10)")
    s.add_argument("--idle-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="close a keep-alive connection idle this long (default: 5)")
    s.add_argument("--max-connections", type=int, default=1000, metavar="N",
                   help="open connections at most; beyond it a new one replaces the oldest idle one, or gets 503"
                        " when all are busy (default: 1000, kept under the open-file limit)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on Ctrl-C or SIGTERM, wait at most this long for requests in flight (default: 30)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ChatGLMError
    from ..extras import require_extra

    require_extra("serve", "fastapi", "uvicorn")
    import uvicorn

    from ..engine import Engine
    from ..http_limits import raise_open_file_limit, server_config
    from ..server import LOCAL_HOSTS, create_app, loopback_warning

    if args.max_batch < 1 or args.max_queue < 0:
        raise ChatGLMError("--max-batch must be >= 1 and --max-queue >= 0")
    for flag in ("request_timeout", "idle_timeout", "shutdown_timeout"):
        value = getattr(args, flag)
        if not 0 < value < 1e6:
            raise ChatGLMError(f"--{flag.replace('_', '-')} must be a positive number of seconds, not {value}")
    if args.max_connections < 1:
        raise ChatGLMError(f"--max-connections must be at least 1, not {args.max_connections}")
    wildcard = args.host in ("0.0.0.0", "::", "")
    allowed = tuple(args.allow_host) if args.allow_host else LOCAL_HOSTS + (() if wildcard else (args.host,))
    sock = listening_socket(args.host, args.port)  # before minutes of loading, not after
    model, tokenizer = load_from_args(args)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
                    decode=args.compile, compile_in_background=not args.compile_at_start)
    app = create_app(engine, api_key=args.api_key, model_name=args.model_name, max_body_bytes=args.max_body_bytes,
                     allowed_hosts=allowed)
    warning = loopback_warning(args.host, args.api_key)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"serving {args.model_name} on http://{args.host}:{args.port} ({args.max_batch} slots x {engine.max_context}"
          " tokens); the chat page is at /", file=sys.stderr)
    if wildcard and not args.allow_host:
        print(f"note: listening on {args.host} but answering only Host names {', '.join(allowed)}; add"
              " --allow-host NAME for the names or addresses clients use", file=sys.stderr)
    raise_open_file_limit()
    server = uvicorn.Server(server_config(
        app, host=args.host, port=args.port, log_level=args.log_level, request_timeout=args.request_timeout,
        idle_timeout=args.idle_timeout, max_connections=args.max_connections, shutdown_timeout=args.shutdown_timeout))

    def after_drain(sig, frame):
        # uvicorn handles SIGTERM itself (waits for open requests, then the app's lifespan drains the engine) and
        # re-raises it once done: then exit 0. Before uvicorn listens, SIGTERM ends the process as usual.
        if not server.should_exit:
            raise SystemExit(128 + sig)

    signal.signal(signal.SIGTERM, after_drain)
    server.run(sockets=[sock])
    return 0


def listening_socket(host: str, port: int):
    """The server's socket, bound now: a taken port is one clear error (exit code 4), not uvicorn's exit 3."""
    import socket

    from ..errors import AddressInUseError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart need not wait
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise AddressInUseError(f"cannot listen on {host}:{port} ({e.strerror}); stop the other server or pass --port N")
    return sock
