#!/usr/bin/env python
"""Spec entry point: check a stage's promotion gate (shim onto `llm-pipeline gates`)."""

import sys

from llm_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["gates", *sys.argv[1:]]))
