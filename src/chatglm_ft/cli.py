"""The `chatglm-ft` command line. Each subcommand lives in `commands/<name>.py` with its own
`register(subparsers)`; heavy imports happen inside the handlers so `--help` stays fast."""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

from . import __version__
from .errors import ChatGLMError

COMMANDS = ["chat", "generate", "serve", "train", "eval", "merge", "quantize", "bench", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatglm-ft",
        description="Run ChatGLM-6B locally and fine-tune it with LoRA.",
    )
    parser.add_argument("--version", action="version", version=f"chatglm-ft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except ChatGLMError as e:
        print(f"chatglm-ft {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except ImportError as e:
        from .extras import missing_extra

        hint = missing_extra(e, args.command)
        if hint is None:
            raise
        print(f"chatglm-ft {args.command}: error: {hint}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"chatglm-ft {args.command}: error: the disk is full{where}; free some space (or choose another"
              " output directory) and run the command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
            print(
                f"chatglm-ft {args.command}: error: out of GPU memory; use --quantize int4/int8, a smaller batch"
                " or a shorter --max-length",
                file=sys.stderr,
            )
            return 3
        raise


if __name__ == "__main__":
    raise SystemExit(main())
