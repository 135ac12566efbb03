"""Fixtures of the operations tests: a run folder with real committed checkpoints, built in seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from llm_pipeline.checkpoint.dcp import CheckpointManager
from llm_pipeline.train.config import PretrainConfig, TrainingConfig


def _model_and_opt() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    return model, opt


def write_checkpoints(stage_dir: Path, steps: list[int], max_steps: int) -> None:
    """Real DCP checkpoints (committed, with checksums) of a small model, as a run saves them."""
    model, opt = _model_and_opt()
    cfg = PretrainConfig(training=TrainingConfig(max_steps=max_steps))
    mgr = CheckpointManager(stage_dir, keep_last=len(steps))
    for step in steps:
        with torch.no_grad():
            model[0].weight.add_(0.01)  # every step's weights differ
        mgr.save(step, model=model, optimizer=opt, trainer_state={"step": step}, rank_state={"pos": step}, config=cfg)
    mgr.close()


@pytest.fixture(scope="session")
def run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/x: pretrain (checkpoints 2, 4, 6, 8 of max 8) + its export, sft (3, 6 of 10), promotions."""
    from llm_pipeline.checkpoint.hf import save_pretrained
    from llm_pipeline.model import get_preset
    from llm_pipeline.model.llama import build_model

    run = tmp_path_factory.mktemp("template") / "runs" / "x"
    ck = run / "checkpoints"
    write_checkpoints(ck / "pretrain", [2, 4, 6, 8], max_steps=8)
    write_checkpoints(ck / "sft", [3, 6], max_steps=10)
    save_pretrained(build_model(get_preset("debug")), ck / "pretrain_final")
    (run / "promoted").mkdir()
    # as the pipeline records it: the export; and an operator's promotion of a mid-run checkpoint
    for stage, model_dir in (("pretrain", str(ck / "pretrain_final")), ("sft", "checkpoints/sft/checkpoint-3")):
        (run / "promoted" / f"{stage}.json").write_text(json.dumps({"stage": stage, "model_dir": model_dir}))
    return run


@pytest.fixture
def run_dir(run_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template run (tests delete and damage things)."""
    dst = tmp_path / "runs" / "x"
    shutil.copytree(run_template, dst)
    for rec in (dst / "promoted").glob("*.json"):
        rec.write_text(rec.read_text().replace(str(run_template), str(dst)))
    return dst
