#!/usr/bin/env python
"""Spec entry point: this machine's GPUs, FP8 capability and memory (`llm-pipeline preflight --devices`).

python scripts/gpu_utils.py            # versions, each GPU, FP8 yes/no and why, free memory, bf16 peak
python scripts/gpu_utils.py --json
"""

import sys

import _venv  # noqa: F401  (re-runs under .venv/bin/python when needed)

from llm_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["preflight", "--devices", *sys.argv[1:]]))
