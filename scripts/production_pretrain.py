#!/usr/bin/env python
"""Deprecated spec entry point, kept for old commands: `scripts/05_pretrain.py --fp8` does this now."""

import sys

import _venv  # noqa: F401  (re-runs under .venv/bin/python when needed)

from llm_pipeline.cli import main

if __name__ == "__main__":
    print("deprecated: use scripts/05_pretrain.py --fp8 (running it now with your arguments)", file=sys.stderr)
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", "configs/pretrain.yaml", *argv]
    sys.exit(main(["pretrain", "--fp8", *argv]))  # a later --no-fp8 of yours still wins
