#!/usr/bin/env python
"""Spec entry point: evaluate a checkpoint (shim onto `llm-pipeline eval`)."""

import sys

from llm_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
