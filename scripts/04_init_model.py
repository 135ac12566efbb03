#!/usr/bin/env python
"""Spec entry point: initialise a model (shim onto `llm-pipeline init`)."""

import sys

import _venv  # noqa: F401  (re-runs under .venv/bin/python when needed)

from llm_pipeline.cli import main

if __name__ == "__main__":
    args = sys.argv[1:] or ["--preset", "7b", "--output", "checkpoints/init"]
    sys.exit(main(["init", *args]))
