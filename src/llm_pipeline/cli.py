"""The ``llm-pipeline`` command line: argument parsing only; every subcommand calls into a module.

Each area registers its subcommands from ``llm_pipeline.commands.<area>`` (a ``register(sub)``
function), so the CLI stays a thin table of entry points.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from llm_pipeline import __version__
from llm_pipeline.config import ConfigError

# One module per area; each exposes ``register(subparsers)``.
COMMAND_MODULES = [
    "llm_pipeline.commands.model",
    "llm_pipeline.commands.gates",
    "llm_pipeline.commands.pipeline",
    "llm_pipeline.commands.data",
    "llm_pipeline.commands.eval",
    "llm_pipeline.commands.train",
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


def main(argv: list[str] | None = None) -> int:
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
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
