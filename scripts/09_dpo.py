#!/usr/bin/env python
"""Spec entry point, same as ``llm-pipeline dpo`` (default config: configs/dpo.yaml)."""

import sys

from llm_pipeline.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", "configs/dpo.yaml", *argv]
    sys.exit(main(["dpo", *argv]))
