#!/usr/bin/env python
"""Spec entry point: the CPU demo pretraining, ``llm-pipeline pretrain --config configs/demo/pretrain.yaml``."""

import sys

from llm_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", "--config", "configs/demo/pretrain.yaml", *sys.argv[1:]]))
