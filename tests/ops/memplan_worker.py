"""Run under ``torchrun --nproc_per_node=2``: the real per-rank peak of each validation setting (gloo, CPU).

Writes ``<rank>.json`` (setting name -> bytes per column) into argv[1]. Driven by test_memplan.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_pipeline.memplan import measure_rank_peak
from ops.memplan_cases import CASES, MODEL, OBJECTIVE, TRAINING


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    got = {name: measure_rank_peak(MODEL, shape, TRAINING, OBJECTIVE) for name, shape in CASES.items()}
    (out / f"{dist.get_rank()}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
