#!/usr/bin/env python
"""Spec entry point, same as ``llm-pipeline pretrain`` (default config: configs/pretrain.yaml)."""

import _venv

if __name__ == "__main__":
    _venv.run("pretrain", "configs/pretrain.yaml")
