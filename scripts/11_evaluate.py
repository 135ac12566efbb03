#!/usr/bin/env python
"""Spec entry point: evaluate a checkpoint (shim onto `llm-pipeline eval`)."""

import sys

import _venv  # noqa: F401  (re-runs under .venv/bin/python when needed)

from llm_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
