#!/usr/bin/env python
"""Spec entry point, same as ``llm-pipeline dpo`` (default config: configs/dpo.yaml)."""

import _venv

if __name__ == "__main__":
    _venv.run("dpo", "configs/dpo.yaml")
