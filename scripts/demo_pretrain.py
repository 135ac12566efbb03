#!/usr/bin/env python
"""Spec entry point: the CPU demo pretraining (tiny preset, embedded stdlib corpus).

Runs ``llm-pipeline data prepare --config configs/demo/data.yaml`` (skips steps already up to date),
then ``llm-pipeline pretrain --config configs/demo/pretrain.yaml [flags]``. ``--help`` only prints help.
"""

import sys

import _venv  # noqa: F401  (re-runs under .venv/bin/python when needed)

from llm_pipeline.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if {"-h", "--help"} & set(argv):  # help is printed, nothing is prepared or trained
        print(__doc__.strip() + "\n\nFlags (passed to `llm-pipeline pretrain`; --config is preset):\n")
        sys.exit(main(["pretrain", "--config", "configs/demo/pretrain.yaml", "--help"]))
    code = main(["data", "prepare", "--config", "configs/demo/data.yaml"])
    if code == 0:
        code = main(["pretrain", "--config", "configs/demo/pretrain.yaml", *argv])
    sys.exit(code)
