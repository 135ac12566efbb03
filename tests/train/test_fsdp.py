"""Two processes with FSDP2 on CPU (gloo, torchrun) match one process, and save/load sharded DCP.

The 2-rank runs also use activation checkpointing (full, then selective with compiled blocks in bf16).
One torchrun job (``fsdp_worker.py``) produces every 2-rank result once per module; each behaviour
is its own test, so a failure names what broke.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_pipeline.checkpoint.hf import load_pretrained
from llm_pipeline.train.pretrain import run_pretraining

from .conftest import source, tiny_config

pytestmark = pytest.mark.slow  # torchrun with two processes


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 2-rank worker's results (losses, resumed losses, OOM, signal, export)."""
    tmp_path = tmp_path_factory.mktemp("fsdp2")
    worker = Path(__file__).with_name("fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    proc = subprocess.run([*cmd, str(tmp_path / "fsdp")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / "fsdp" / "result.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory):
    """The same global batch (4 rows) in one process: micro-batch 2 = the two ranks' rows together."""
    cfg = tiny_config(tmp_path_factory.mktemp("single"), max_steps=4, save_steps=2, micro_batch_size=2)
    return run_pretraining(cfg, train_source=source(cfg))


def _losses(got: dict[str, Any]) -> dict[int, float]:
    return {int(k): v for k, v in got["losses"].items()}


def test_two_process_fsdp_matches_single_process(two_ranks, single):
    losses = _losses(two_ranks)
    assert losses.keys() == single.losses.keys()
    for step, loss in single.losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step


def test_bf16_selective_ac_compiled_close_to_fp32(two_ranks, single):
    """bf16 params/compute (fp32 reduction) with selective AC and compiled blocks: close to fp32."""
    bf16 = {int(k): v for k, v in two_ranks["bf16_compiled"].items()}
    for step in (1, 2):
        assert bf16[step] == pytest.approx(single.losses[step], rel=1e-2)


def test_sharded_checkpoint_resumes_exactly(two_ranks):
    """Resuming the 2-rank sharded checkpoint of step 2 reproduces steps 3-4 exactly."""
    losses = _losses(two_ranks)
    assert {int(k): v for k, v in two_ranks["resumed"].items()} == {3: losses[3], 4: losses[4]}
    assert {"__0_0.distcp", "__1_0.distcp", "rank_0.pt", "rank_1.pt", "COMMITTED"} <= set(two_ranks["checkpoint_files"])


def test_oom_recovery_under_fsdp(two_ranks, single):
    """OOM recovery under FSDP: the step is replayed with half the micro-batch, same losses."""
    assert two_ranks["oom_events"] == 1
    for step, loss in single.losses.items():
        assert two_ranks["oom_losses"][str(step)] == pytest.approx(loss, rel=1e-4), step


def test_chunked_head_and_z_loss_under_fsdp(two_ranks, tmp_path):
    """The chunked LM head + z-loss (2 chunks per micro-batch) under FSDP2 equals one unchunked process."""
    zcfg = tiny_config(tmp_path / "z", max_steps=4, micro_batch_size=2, z_loss_weight=1e-4, loss_chunk_tokens=0)
    zref = run_pretraining(zcfg, train_source=source(zcfg), export=False)
    for step, loss in zref.losses.items():
        assert two_ranks["chunked_losses"][str(step)] == pytest.approx(loss, rel=1e-4), step


def test_signal_on_one_rank_stops_both(two_ranks):
    """A signal on one rank stops both after the same step and leaves one committed checkpoint."""
    assert two_ranks["signal"] == [["preempted", 2], ["preempted", 2]]
    assert "checkpoint-2" in two_ranks["signal_checkpoint"]


def test_gathered_export_equals_single_process(two_ranks, single):
    """The gathered HF export equals the single-process one."""
    a, b = load_pretrained(two_ranks["final_dir"]), load_pretrained(single.final_dir)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=n)
