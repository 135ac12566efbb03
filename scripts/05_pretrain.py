#!/usr/bin/env python
"""Spec entry point: ``python scripts/05_pretrain.py [--config configs/pretrain.yaml] [flags]`` = ``llm-pipeline pretrain``."""

import sys

from llm_pipeline.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", "configs/pretrain.yaml", *argv]
    sys.exit(main(["pretrain", *argv]))
