"""Two processes with FSDP2 on CPU (gloo, torchrun) match one process, and save/load sharded DCP.

The 2-rank runs also use activation checkpointing (full, then selective with compiled blocks in bf16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_pipeline.checkpoint.hf import load_pretrained
from llm_pipeline.train.pretrain import run_pretraining

from .conftest import source, tiny_config


def test_two_process_fsdp_matches_single_process(tmp_path):
    worker = Path(__file__).with_name("fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    proc = subprocess.run([*cmd, str(tmp_path / "fsdp")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "fsdp" / "result.json").read_text())

    # The same global batch (4 rows) in one process: micro-batch 2 = the two ranks' rows together.
    cfg = tiny_config(tmp_path / "single", max_steps=4, save_steps=2, micro_batch_size=2)
    ref = run_pretraining(cfg, train_source=source(cfg))
    losses = {int(k): v for k, v in got["losses"].items()}
    assert losses.keys() == ref.losses.keys()
    for step, loss in ref.losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step

    # bf16 params/compute (fp32 reduction) with selective AC and compiled blocks: close to fp32.
    bf16 = {int(k): v for k, v in got["bf16_compiled"].items()}
    for step in (1, 2):
        assert bf16[step] == pytest.approx(ref.losses[step], rel=1e-2)

    # Resuming the 2-rank sharded checkpoint of step 2 reproduces steps 3-4 exactly.
    assert {int(k): v for k, v in got["resumed"].items()} == {3: losses[3], 4: losses[4]}
    assert {"__0_0.distcp", "__1_0.distcp", "rank_0.pt", "rank_1.pt", "COMMITTED"} <= set(got["checkpoint_files"])

    # OOM recovery under FSDP: the step is replayed with half the micro-batch, same losses.
    assert got["oom_events"] == 1
    for step, loss in ref.losses.items():
        assert got["oom_losses"][str(step)] == pytest.approx(loss, rel=1e-4), step

    # The chunked LM head + z-loss (2 chunks per micro-batch) under FSDP2 equals one unchunked process.
    zcfg = tiny_config(tmp_path / "z", max_steps=4, micro_batch_size=2, z_loss_weight=1e-4, loss_chunk_tokens=0)
    zref = run_pretraining(zcfg, train_source=source(zcfg), export=False)
    for step, loss in zref.losses.items():
        assert got["chunked_losses"][str(step)] == pytest.approx(loss, rel=1e-4), step

    # A signal on one rank stops both after the same step and leaves one committed checkpoint.
    assert got["signal"] == [["preempted", 2], ["preempted", 2]]
    assert "checkpoint-2" in got["signal_checkpoint"]

    # The gathered HF export equals the single-process one.
    a, b = load_pretrained(got["final_dir"]), load_pretrained(ref.final_dir)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=n)
