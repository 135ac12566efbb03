#!/usr/bin/env python
"""Spec entry point: the training report (shim onto `llm-pipeline report`).

    python scripts/generate_report.py              # runs/demo if present, else the newest run under runs/
    python scripts/generate_report.py runs/7b --print
Writes RUN_DIR/report/report.html (self-contained, plots embedded) and RUN_DIR/report/summary.md.
"""

import sys

import _venv  # noqa: F401  (re-runs under .venv/bin/python when needed)

from llm_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
