"""Run under ``torchrun --nproc_per_node=2``: SFT with FSDP2 on CPU/gloo (packed rows, held-out loss, a
vocabulary grown for chat tokens). Writes ``result.json`` (rank 0) into argv[1]. Driven by test_sft.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_pipeline.train.sft import SFTStage
from llm_pipeline.train.stage import run_stage
from train.chat_fixtures import sft_config


def main(out: Path, model: Path, train: Path, val: Path, foreign: Path) -> None:
    # 4 rows per step: each rank takes 2 (micro-batch 1, accumulation 2) of the rows one process takes.
    common = dict(max_steps=4, eval_steps=2, micro_batch_size=1)
    packed = run_stage(SFTStage(sft_config(out / "packed", model, train, val, **common)))
    grown = run_stage(SFTStage(sft_config(out / "grown", foreign, train, **common)), export=False)
    if int(os.environ["RANK"]) == 0:
        result = {"losses": packed.losses, "val_losses": packed.val_losses, "grown": grown.losses,
                  "final_dir": str(packed.final_dir)}  # fmt: skip
        (out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:6]))
