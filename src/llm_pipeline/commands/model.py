"""Model subcommands: init, export, import, generate, info."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # filled in by the core issue
    del sub
