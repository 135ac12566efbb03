#!/usr/bin/env python
"""Spec entry point: check a stage's promotion gate (shim onto `llm-pipeline gates`)."""

import sys

import _venv  # noqa: F401  (re-runs under .venv/bin/python when needed)

from llm_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["gates", *sys.argv[1:]]))
