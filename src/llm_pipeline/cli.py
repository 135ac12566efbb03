"""The ``llm-pipeline`` command line: argument parsing only; every subcommand calls into a module.

Each area registers its subcommands from ``llm_pipeline.commands.<area>`` (a ``register(sub)``
function), so the CLI stays a thin table of entry points. Registering imports nothing heavy (no
torch, no pydantic): ``--help`` answers at once, and each command imports what it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from llm_pipeline import __version__
from llm_pipeline.errors import explain_os_error

# One module per area; each exposes ``register(subparsers)``.
COMMAND_MODULES = [
    "llm_pipeline.commands.model",
    "llm_pipeline.commands.gates",
    "llm_pipeline.commands.pipeline",
    "llm_pipeline.commands.data",
    "llm_pipeline.commands.eval",
    "llm_pipeline.commands.train",
    "llm_pipeline.commands.ckpt",
    "llm_pipeline.commands.preflight",
    "llm_pipeline.commands.report",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-pipeline",
        description="Raw text to an evaluated, HF-loadable LLaMA-style checkpoint.",
    )
    parser.add_argument("--version", action="version", version=f"llm-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; every user-facing failure ends in one ``error:`` line, never a traceback.

    Configuration errors exit 2, other failures (missing or bad files, disk full, read-only or
    forbidden folders, a folder in use, a damaged checkpoint) exit 1, Ctrl-C exits 130. With
    ``-v``/``--verbose`` the traceback is printed as well. Exceptions of other types are bugs: they
    keep their traceback so they can be reported.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from llm_pipeline.checkpoint.lock import FolderLocked
    from llm_pipeline.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        return _fail(args, e, str(e), 2)
    except OSError as e:  # disk full, read-only, permission denied, missing file...
        return _fail(args, e, explain_os_error(e), 1)
    except (ValueError, RuntimeError, FolderLocked) as e:
        return _fail(args, e, str(e) or type(e).__name__, 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(args: argparse.Namespace, exc: BaseException, message: str, code: int) -> int:
    if args.verbose:
        traceback.print_exception(exc)
    print(f"error: {message}", file=sys.stderr)
    return code
