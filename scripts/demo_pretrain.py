#!/usr/bin/env python
"""Spec entry point: the CPU demo pretraining (tiny preset, embedded stdlib corpus).

Runs ``llm-pipeline data prepare --config configs/demo/data.yaml`` (skips steps already up to date),
then ``llm-pipeline pretrain --config configs/demo/pretrain.yaml [flags]``.
"""

import sys

from llm_pipeline.cli import main

if __name__ == "__main__":
    code = main(["data", "prepare", "--config", "configs/demo/data.yaml"])
    if code == 0:
        code = main(["pretrain", "--config", "configs/demo/pretrain.yaml", *sys.argv[1:]])
    sys.exit(code)
