"""Run under ``torchrun --nproc_per_node=2``: FSDP2 training on CPU/gloo, checkpoint, resume, HF export.

Writes ``result.json`` (rank 0) into the folder given as argv[1]. Driven by test_fsdp.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_pipeline.train.pretrain import run_pretraining
from train.conftest import source, tiny_config


def main(out: Path) -> None:
    cfg = tiny_config(out, max_steps=4, save_steps=2, micro_batch_size=1)
    cfg.parallel.activation_checkpointing = "full"  # wrappers under FSDP: same numerics, clean DCP names
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    first = run_pretraining(cfg, train_source=source(cfg, rank=rank, world_size=world))
    # A second job: fresh model and loader, resumed from the sharded checkpoint of step 2.
    cfg2 = tiny_config(out, max_steps=4, micro_batch_size=1, resume_from_checkpoint=str(out / "ckpt/checkpoint-2"))
    cfg2.training.output_dir = out / "ckpt2"
    (out / "ckpt2").mkdir(parents=True, exist_ok=True)
    second = run_pretraining(cfg2, train_source=source(cfg2, rank=rank, world_size=world), export=False)
    # The production composition: bf16 MixedPrecisionPolicy + selective AC + per-block compile, sharded.
    cfg3 = tiny_config(out / "bf16", max_steps=2, micro_batch_size=1, precision="bf16")
    cfg3.parallel.activation_checkpointing = "selective"
    cfg3.parallel.compile = True
    third = run_pretraining(cfg3, train_source=source(cfg3, rank=rank, world_size=world), export=False)
    # SIGTERM reaches rank 0 only: every rank must still stop after the same step, with one checkpoint.
    from train.test_trainer import SignalAt

    cfg4 = tiny_config(out / "sig", max_steps=6, micro_batch_size=1)
    fourth = run_pretraining(
        cfg4,
        train_source=source(cfg4, rank=rank, world_size=world),
        callbacks=[SignalAt(2)] if rank == 0 else [],
        export=False,
    )
    # An OOM on every rank in the same forward (same shapes, same memory): all shrink and replay together.
    from train.test_trainer import OOMOnce

    cfg5 = tiny_config(out / "oom", max_steps=4, micro_batch_size=2, enable_oom_recovery=True)
    fifth = run_pretraining(
        cfg5, train_source=source(cfg5, rank=rank, world_size=world), callbacks=[OOMOnce(2)], export=False
    )
    # The LM head in chunks of 16 tokens (2 per micro-batch) under FSDP2: the head runs inside the root forward.
    cfg6 = tiny_config(out / "chunk", max_steps=4, micro_batch_size=1, loss_chunk_tokens=16, z_loss_weight=1e-4)
    sixth = run_pretraining(cfg6, train_source=source(cfg6, rank=rank, world_size=world), export=False)
    statuses = [None] * world
    dist.all_gather_object(statuses, (fourth.status, fourth.step))
    if rank == 0:
        result = {
            "signal": statuses,
            "oom_losses": fifth.losses,
            "oom_events": fifth.oom_events,
            "chunked_losses": sixth.losses,
            "signal_checkpoint": sorted(p.name for p in (out / "sig" / "ckpt").iterdir()),
            "bf16_compiled": third.losses,
            "world": world,
            "losses": first.losses,
            "resumed": second.losses,
            "final_dir": str(first.final_dir),
            "checkpoint_files": sorted(p.name for p in (out / "ckpt/checkpoint-4").iterdir()),
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
