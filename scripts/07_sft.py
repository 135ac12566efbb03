#!/usr/bin/env python
"""Spec entry point, same as ``llm-pipeline sft`` (default config: configs/sft.yaml)."""

import _venv

if __name__ == "__main__":
    _venv.run("sft", "configs/sft.yaml")
