"""One torchrun worker of the two-node test (``torchrun --nnodes 2 --nproc-per-node 1``, two agents on
localhost, c10d rendezvous, gloo): runs each command of the JSON list in argv[1] through the project's CLI
(``llm_pipeline.cli.main``, the ``llm-pipeline`` entry point) in order, in this one process, as a
node of a multi-node job runs ``llm-pipeline <kind> --config ...``. Sharing the process (and so its
process group) across the commands pays torchrun's start-up once. Exits with the first non-zero code.
Driven by test_multinode.py."""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from llm_pipeline.cli import main


def run(commands: list[list[str]]) -> int:
    for argv in commands:
        code = main(argv)
        if code:
            print(f"multinode worker: {' '.join(argv)} exited with {code}", file=sys.stderr)
            return code
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.argv[1])))
