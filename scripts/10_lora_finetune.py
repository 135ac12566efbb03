#!/usr/bin/env python
"""Spec entry point, same as ``llm-pipeline lora`` (default config: configs/lora_finetune.yaml)."""

import _venv

if __name__ == "__main__":
    _venv.run("lora", "configs/lora_finetune.yaml")
