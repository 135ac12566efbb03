#!/usr/bin/env python
"""Spec entry point: `llm-pipeline data clean` (arguments pass through, e.g. --config configs/data.yaml)."""

import sys

import _venv  # noqa: F401  (re-runs under .venv/bin/python when needed)

from llm_pipeline.cli import main

if __name__ == "__main__":  # datatrove's local executor spawns processes: keep the guard
    sys.exit(main(["data", "clean", *sys.argv[1:]]))
