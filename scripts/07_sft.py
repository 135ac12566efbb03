#!/usr/bin/env python
"""Spec entry point, same as ``llm-pipeline sft`` (default config: configs/sft.yaml)."""

import sys

from llm_pipeline.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", "configs/sft.yaml", *argv]
    sys.exit(main(["sft", *argv]))
