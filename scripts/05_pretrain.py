#!/usr/bin/env python
"""Spec entry point, same as ``llm-pipeline pretrain`` (default config: configs/pretrain.yaml)."""

import sys

import _venv  # noqa: F401  (re-runs under .venv/bin/python when needed)

from llm_pipeline.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", "configs/pretrain.yaml", *argv]
    sys.exit(main(["pretrain", *argv]))
