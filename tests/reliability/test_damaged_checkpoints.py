"""Checkpoints prove their integrity: bit flips, truncation, missing or edited files are detected before a
resume uses them; a resume falls back to the previous checkpoint and still reproduces the run exactly."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from llm_pipeline.checkpoint import checksums
from llm_pipeline.checkpoint.checksums import ChecksumMismatch
from llm_pipeline.checkpoint.dcp import CheckpointManager, latest_checkpoint, load_checkpoint

from .conftest import MAX_STEPS, Reference, assert_checkpoints_valid, assert_reproduces, copy_run


def flip(path, offset=None, length=4096):
    """Invert ``length`` bytes in the middle of a file (a disk or memory error)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    for i in range(start, min(start + length, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_bit_flipped_newest_checkpoint_falls_back_and_reproduces(tmp_path, reference: Reference):
    run = copy_run(reference.run, tmp_path)
    flip(run.out / f"checkpoint-{MAX_STEPS}" / "__0_0.distcp")  # 4 KiB inside the weights
    proc = run.cli()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint-{MAX_STEPS}" in proc.stderr and "damaged" in proc.stderr
    assert_reproduces(run, reference)  # retrained steps 7-8 from checkpoint-6: same losses, same weights
    assert assert_checkpoints_valid(run) == [MAX_STEPS - 2, MAX_STEPS]


def _model_and_opt(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    return model, opt


def _saved(tmp_path, **kw):
    model, opt = _model_and_opt(0)
    mgr = CheckpointManager(tmp_path, **kw)
    path = mgr.save(3, model=model, optimizer=opt, trainer_state={"step": 3}, rank_state={"pos": 1})
    mgr.close()
    return model, path


DAMAGE = {
    "distcp bit flip": lambda p: flip(p / "__0_0.distcp", length=64),
    "truncated shard": lambda p: (p / "__0_0.distcp").write_bytes((p / "__0_0.distcp").read_bytes()[:100]),
    "trainer_state bit flip": lambda p: flip(p / "trainer_state.pt", length=1),
    "metadata bit flip": lambda p: flip(p / ".metadata", length=8),
    "rank state deleted": lambda p: (p / "rank_0.pt").unlink(),
    "meta.json edited": lambda p: (p / "meta.json").write_text('{"step": 3, "world_size": 1}\n'),
    "manifest edited": lambda p: (p / checksums.MANIFEST).write_text(
        (p / checksums.MANIFEST).read_text().replace("a", "b", 1).replace("0", "1", 1)
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_kind_of_damage_is_detected_before_loading(tmp_path, damage):
    _, path = _saved(tmp_path)
    DAMAGE[damage](path)
    fresh, opt = _model_and_opt(1)
    with pytest.raises(ChecksumMismatch, match="damaged since it was written"):
        load_checkpoint(path, model=fresh, optimizer=opt)
    assert isinstance(ChecksumMismatch("x"), RuntimeError)  # what the trainer's fallback catches


def test_verification_can_be_skipped(tmp_path):
    _, path = _saved(tmp_path, verify_checksums=False)
    clean, clean_opt = _model_and_opt(1)
    load_checkpoint(path, model=clean, optimizer=clean_opt)
    flip(path / "__0_0.distcp", length=64)
    fresh, opt = _model_and_opt(1)
    mgr = CheckpointManager(tmp_path, verify_checksums=False)
    mgr.load(path, model=fresh, optimizer=opt)  # loads, damage and all: the user asked for it
    mgr.close()
    a, b = clean_opt.state_dict()["state"], opt.state_dict()["state"]
    same = [torch.equal(x, y) for x, y in zip(clean.parameters(), fresh.parameters(), strict=True)]
    same += [torch.equal(a[k][n], b[k][n]) for k in a for n in ("exp_avg", "exp_avg_sq")]
    assert not all(same)


def test_checkpoint_from_before_manifests_loads_with_a_warning(tmp_path, caplog):
    model, path = _saved(tmp_path)
    (path / checksums.MANIFEST).unlink()
    fresh, opt = _model_and_opt(1)
    with caplog.at_level("WARNING"):
        load_checkpoint(path, model=fresh, optimizer=opt)
    assert "not verified" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))


def test_manifest_is_written_off_the_training_thread_with_async_save(tmp_path, monkeypatch):
    threads = []
    real = checksums.write_part

    def record(*a, **k):
        threads.append(threading.current_thread())
        return real(*a, **k)

    monkeypatch.setattr(checksums, "write_part", record)
    model, opt = _model_and_opt(0)
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, model=model, optimizer=opt, trainer_state={"step": 1}, rank_state={})
    assert threads and all(t is not threading.main_thread() for t in threads)
    path = latest_checkpoint(tmp_path)
    assert (path / checksums.MANIFEST).is_file()
    fresh, fopt = _model_and_opt(1)
    load_checkpoint(path, model=fresh, optimizer=fopt)  # the manifest matches what was written


@pytest.mark.slow
def test_export_of_a_damaged_checkpoint_is_refused(tmp_path, reference: Reference, capsys):
    from llm_pipeline.cli import main

    run = copy_run(reference.run, tmp_path)
    flip(run.out / f"checkpoint-{MAX_STEPS}" / "__0_0.distcp")
    code = main(["export", str(run.out), str(tmp_path / "exported")])
    err = capsys.readouterr().err
    assert code in (1, 2) and f"checkpoint-{MAX_STEPS}" in err and "damaged" in err
    assert not (tmp_path / "exported").exists()
