#!/usr/bin/env python
"""Spec entry point, same as ``llm-pipeline data clean``, with ``--config configs/data.yaml`` unless you
give one (runs/data/raw -> runs/data/clean). The offline demo corpus: --config configs/demo/data.yaml.
"""

import _venv

if __name__ == "__main__":  # datatrove's local executor spawns processes: keep the guard
    _venv.run("data clean", "configs/data.yaml")
