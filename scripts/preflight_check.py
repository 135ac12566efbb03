#!/usr/bin/env python
"""Spec entry point: pre-flight checks (shim onto `llm-pipeline preflight`; default config configs/pipeline.yaml).

    python scripts/preflight_check.py                                   # the production pipeline, this machine
    python scripts/preflight_check.py --config configs/pretrain.yaml --gpus 8 --gpu-memory-gib 80
Exit 0: ready (warnings allowed); 1: blockers; 2: a configuration mistake.
"""

import sys

import _venv  # noqa: F401  (re-runs under .venv/bin/python when needed)

from llm_pipeline.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--config" not in argv and "--devices" not in argv and not {"-h", "--help"} & set(argv):
        argv = ["--config", "configs/pipeline.yaml", *argv]
    sys.exit(main(["preflight", *argv]))
