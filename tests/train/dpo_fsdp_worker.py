"""Run under ``torchrun --nproc_per_node=2``: the DPO stage on FSDP2 (CPU/gloo), reference pass included.

argv: output folder, JSON of the start paths (dpo_setup.make_start). Writes ``result.json`` (rank 0).
Driven by test_dpo.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_pipeline.train.dpo import DPOStage
from llm_pipeline.train.stage import run_stage
from train.dpo_setup import dpo_config


def main(out: Path, start: dict[str, Path]) -> None:
    # One pair per forward per rank: the global batch (4 pairs) is the single-process run's.
    stage = DPOStage(dpo_config(out, start, max_steps=4, eval_steps=4, micro_batch_size=1))
    result = run_stage(stage, export=False)
    # A live reference: a second FSDP2 model, frozen, next to the policy.
    live = run_stage(
        DPOStage(dpo_config(out / "live", start, max_steps=2, micro_batch_size=1, dpo={"reference": "live"})),
        export=False,
    )
    if dist.get_rank() == 0:
        report = {k: stage.reference_report[k] for k in ("keys", "paths", "computed")}
        result_json = {
            "losses": result.losses, "eval": result.eval_metrics[4], "reference": report, "live_losses": live.losses,
        }  # fmt: skip
        (out / "result.json").write_text(json.dumps(result_json))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), {k: Path(v) for k, v in json.loads(sys.argv[2]).items()})
