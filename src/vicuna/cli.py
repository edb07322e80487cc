"""The `vicuna` command: one entry point, a thin shim per area.

Each area module exposes ``add_commands(subparsers)`` and registers its own
subcommands; each command's handler is a function ``(args) -> int | None``.
Areas are imported lazily so ``vicuna templates list`` does not pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .commands import HelpFormatter
from .errors import VicunaError
from .files import Terminated, raise_on_sigterm, terminated

# area name -> module with add_commands(subparsers)
AREAS = {
    "templates": "vicuna.templates_cli",
    "chat": "vicuna.serve.chat",
    "data": "vicuna.data.cli",
    "train": "vicuna.train.cli",
    "weights": "vicuna.weights",
    "serve": "vicuna.serve.cli",
    "arena": "vicuna.serve.arena_cli",
    "eval": "vicuna.eval.cli",
    "recipe": "vicuna.recipe",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vicuna",
        description="Train, serve and evaluate Vicuna-style chat assistants.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vicuna {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="area", metavar="COMMAND")
    # Import only the area being run (plus all of them for top-level --help).
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for area, module in AREAS.items():
        if wanted in AREAS and area != wanted:
            sub.add_parser(area, help=argparse.SUPPRESS)
            continue
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.debug:  # one INFO line per HTTP request drowns the progress of eval runs
        for noisy in ("httpx", "httpx2", "httpcore", "openai"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        # `vicuna data` with no verb: show that area's help
        (getattr(args, "area_parser", None) or parser).print_help()
        return 2 if args.area else 0
    raise_on_sigterm()  # so SIGTERM, like Ctrl-C, removes temporary files on its way out
    try:
        code = int(args.func(args) or 0)
        if terminated():  # SIGTERM came, but its exception was swallowed (see files.terminated)
            raise Terminated()
        return code
    except VicunaError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
