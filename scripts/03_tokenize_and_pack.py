#!/usr/bin/env python
"""Spec entry point: ``llm-pipeline data tokenizer`` then ``llm-pipeline data pack``, both with your flags
and ``--config configs/data.yaml`` unless you give one (runs/data/clean -> runs/data/tokenizer and
runs/data/packed). The offline demo corpus: --config configs/demo/data.yaml.
"""

import argparse
import sys

import _venv

if __name__ == "__main__":  # datatrove's local executor spawns processes: keep the guard
    from llm_pipeline.cli import main
    from llm_pipeline.commands.data import add_data_flags

    parser = argparse.ArgumentParser(prog="scripts/03_tokenize_and_pack.py", description=__doc__)
    add_data_flags(parser)
    parser.parse_args()  # this script's own --help, and a mistyped flag is refused before either step runs
    argv = _venv.with_default_config(sys.argv[1:], "configs/data.yaml")
    sys.exit(main(["data", "tokenizer", *argv]) or main(["data", "pack", *argv]))
