#!/usr/bin/env python
"""Spec entry point, same as ``llm-pipeline lora`` (default config: configs/lora_finetune.yaml)."""

import sys

from llm_pipeline.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", "configs/lora_finetune.yaml", *argv]
    sys.exit(main(["lora", *argv]))
