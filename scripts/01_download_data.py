#!/usr/bin/env python
"""Spec entry point, same as ``llm-pipeline data download``, with ``--config configs/data.yaml`` unless
you give one: the production corpus, FineWeb-Edu streamed from the Hugging Face hub into runs/data/raw
(network needed). The offline demo corpus (this Python's standard library): --config configs/demo/data.yaml.
"""

import _venv

if __name__ == "__main__":  # datatrove's local executor spawns processes: keep the guard
    _venv.run("data download", "configs/data.yaml")
