#!/usr/bin/env python
"""Deprecated spec entry point, kept for old commands: `scripts/05_pretrain.py` (GPUs) or
`scripts/demo_pretrain.py` (CPU, tiny model) do this now; it runs 05_pretrain.py with your arguments."""

import sys

import _venv  # noqa: F401  (re-runs under .venv/bin/python when needed)

from llm_pipeline.cli import main

if __name__ == "__main__":
    print(
        "deprecated: use scripts/05_pretrain.py (the full model, GPUs) or scripts/demo_pretrain.py (CPU, tiny "
        "model); running scripts/05_pretrain.py with your arguments now",
        file=sys.stderr,
    )
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", "configs/pretrain.yaml", *argv]
    sys.exit(main(["pretrain", *argv]))
