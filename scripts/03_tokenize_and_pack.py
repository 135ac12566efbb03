#!/usr/bin/env python
"""Spec entry point: `llm-pipeline data tokenizer` then `data pack` (arguments pass through to both)."""

import sys

import _venv  # noqa: F401  (re-runs under .venv/bin/python when needed)

from llm_pipeline.cli import main

if __name__ == "__main__":  # datatrove's local executor spawns processes: keep the guard
    sys.exit(main(["data", "tokenizer", *sys.argv[1:]]) or main(["data", "pack", *sys.argv[1:]]))
