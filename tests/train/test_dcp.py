"""DCP checkpoints: contents, atomic commit, pruning, resume resolution, async save."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm_pipeline.checkpoint.dcp import (
    COMMIT_MARKER,
    CheckpointManager,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
)


def _model_and_opt(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _save(mgr: CheckpointManager, step: int, model, opt):
    return mgr.save(
        step,
        model=model,
        optimizer=opt,
        trainer_state={"step": step},
        rank_state={"loader": {"pos": step * 10}},
    )


def test_save_load_roundtrip(tmp_path):
    model, opt = _model_and_opt(0)
    path = _save(CheckpointManager(tmp_path, keep_last=2), 7, model, opt)
    names = {p.name for p in path.iterdir()}
    assert {".metadata", COMMIT_MARKER, "trainer_state.pt", "rank_0.pt", "meta.json"} <= names
    other, other_opt = _model_and_opt(1)
    state, rank_state = load_checkpoint(path, model=other, optimizer=other_opt)
    assert state == {"step": 7} and rank_state == {"loader": {"pos": 70}}
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)
    a, b = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(a[k]["exp_avg_sq"], b[k]["exp_avg_sq"]) for k in a)


def test_only_committed_folders_count_and_keep_last(tmp_path):
    model, opt = _model_and_opt(0)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        _save(mgr, step, model, opt)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    # a crash mid-save: the folder exists but was never committed
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / ".metadata").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"
    assert resolve_resume("auto", tmp_path).name == "checkpoint-3"
    with pytest.raises(ValueError, match="auto"):
        resolve_resume(str(tmp_path / "checkpoint-9"), tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_resume(str(tmp_path / "checkpoint-100"), tmp_path)
    assert resolve_resume("auto", tmp_path / "empty") is None
    assert resolve_resume(None, tmp_path) is None


def test_stale_temp_folders_are_cleared_and_steps_can_be_resaved(tmp_path):
    (tmp_path / ".tmp-checkpoint-4").mkdir(parents=True)
    model, opt = _model_and_opt(0)
    mgr = CheckpointManager(tmp_path)
    assert not (tmp_path / ".tmp-checkpoint-4").exists()
    _save(mgr, 4, model, opt)
    _save(mgr, 4, model, opt)  # e.g. a signal right after a scheduled save
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]


def test_async_save_commits_on_wait(tmp_path):
    model, opt = _model_and_opt(0)
    mgr = CheckpointManager(tmp_path, async_save=True)
    path = _save(mgr, 5, model, opt)
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # training goes on while the copy is written
        for p in model.parameters():
            p.add_(1.0)
    mgr.wait()
    assert latest_checkpoint(tmp_path) == path
    fresh, fresh_opt = _model_and_opt(1)
    load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    for p, q in zip(saved, fresh.parameters(), strict=True):
        assert torch.equal(p, q)
