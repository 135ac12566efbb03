#!/usr/bin/env python
"""Spec entry point (the spec's tree names it beside 02_clean_deduplicate_optimized.py; they are the same):
``llm-pipeline data clean``, with ``--config configs/data.yaml`` unless you give one.
"""

import _venv

if __name__ == "__main__":  # datatrove's local executor spawns processes: keep the guard
    _venv.run("data clean", "configs/data.yaml")
