"""Run under ``torchrun --nproc_per_node=2``: emulated FP8 training under FSDP2 on CPU/gloo.

Writes ``result.json`` (rank 0) into the folder given as argv[1]. Driven by test_fp8_emulation_fsdp.py.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_pipeline.train.pretrain import run_pretraining
from train.conftest import source, tiny_config

# Count the float8 all-gathers: torchao's weight subclass casts its shard to float8 before FSDP2 gathers it.
GATHERS = {"n": 0}
_pre_all_gather = WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather


@functools.wraps(_pre_all_gather)  # FSDP2 checks the hook's signature
def _counting_pre_all_gather(self, *args, **kwargs):
    GATHERS["n"] += 1
    return _pre_all_gather(self, *args, **kwargs)


WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather = _counting_pre_all_gather


def run(out: Path, steps: int, **parallel_cfg) -> dict:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = tiny_config(out, max_steps=steps, micro_batch_size=1, logging_steps=1)
    cfg.parallel.fp8 = None  # auto: on through fp8_emulate
    for k, v in parallel_cfg.items():
        setattr(cfg.parallel, k, v)
    before = GATHERS["n"]
    result = run_pretraining(cfg, train_source=source(cfg, rank=rank, world_size=world), export=False)
    return {"losses": result.losses, "float8_gathers": GATHERS["n"] - before}


def main(out: Path) -> None:
    runs = {
        "tensorwise": run(out / "tw", 20, fp8_emulate=True, fp8_recipe="tensorwise"),
        "rowwise": run(out / "rw", 20, fp8_emulate=True, fp8_recipe="rowwise"),
        # AC wrappers around float8 blocks, under FSDP2 (compile + float8 is single-process: see the test).
        "selective_ac": run(out / "ac", 4, fp8_emulate=True, activation_checkpointing="selective"),
    }
    if int(os.environ["RANK"]) == 0:
        (out / "result.json").write_text(json.dumps({"world": dist.get_world_size(), **runs}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
