"""A full disk or a read-only folder ends in one line that names the folder and the fix, and loses
nothing valid: the previous checkpoints stay, no partial folder is left, and the run resumes exactly.

Where the platform allows it, the disk really is full: a small tmpfs mounted in a private mount
namespace (``unshare``). The in-process tests simulate ``ENOSPC`` and run everywhere.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil

import pytest
import torch
from torch import nn

from llm_pipeline.checkpoint.dcp import CheckpointManager, list_checkpoints, load_checkpoint
from llm_pipeline.errors import explain_os_error

from .conftest import (
    MAX_STEPS,
    Reference,
    assert_checkpoints_valid,
    assert_one_line_error,
    assert_reproduces,
    copy_run,
    leftovers,
    make_run,
    on_tmpfs,
)


def _checkpoint_bytes(ref: Reference) -> int:
    path = ref.run.out / f"checkpoint-{MAX_STEPS}"
    return sum(p.stat().st_size for p in path.iterdir())


def _full_disk_run(tmp_path, packed, reference, fault=""):
    """Checkpoints on a tmpfs with room for two and a half: checkpoint-6 cannot fit beside 2 and 4."""
    mnt, saved = tmp_path / "disk", tmp_path / "saved"
    saved.mkdir()
    run = make_run(tmp_path, packed, output_dir=str(mnt / "ckpt"))
    after = f"cp -a {shlex.quote(str(mnt))}/. {shlex.quote(str(saved))}/"
    proc = run.cli(fault=fault, prefix=on_tmpfs(mnt, int(2.6 * _checkpoint_bytes(reference)), after=after))
    return run, proc, saved


@pytest.mark.slow
def test_full_disk_is_refused_before_writing_and_the_run_resumes_exactly(tmp_path, packed, reference: Reference):
    run, proc, saved = _full_disk_run(tmp_path, packed, reference)
    line = assert_one_line_error(proc)
    assert "not enough free space" in line and str(run.out) in line and "checkpoint-6" in line
    assert "completed" not in proc.stdout
    # What the full disk held (copied out before the tmpfs went away): the two checkpoints, nothing partial.
    moved = copy_run(run, tmp_path / "bigger")
    shutil.rmtree(moved.out, ignore_errors=True)
    shutil.copytree(saved / "ckpt", moved.out)
    assert assert_checkpoints_valid(moved) == [2, 4] and leftovers(moved) == []
    proc = moved.cli()  # the same run on a disk with room: resumes from checkpoint-4
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_reproduces(moved, reference)


@pytest.mark.slow
def test_disk_filling_up_during_a_save_is_one_clear_error(tmp_path, packed, reference: Reference):
    """The free-space check is fooled (another process fills the disk): the write itself fails."""
    run, proc, saved = _full_disk_run(tmp_path, packed, reference, fault="disk-lies")
    line = assert_one_line_error(proc)
    assert "no space left" in line and str(run.out) in line and "checkpoint-6" in line
    assert "unexpected pos" not in proc.stderr
    moved = copy_run(run, tmp_path / "bigger")
    shutil.rmtree(moved.out, ignore_errors=True)
    shutil.copytree(saved / "ckpt", moved.out)
    assert assert_checkpoints_valid(moved) == [2, 4] and leftovers(moved) == []


@pytest.mark.slow
def test_read_only_checkpoint_folder(tmp_path, reference: Reference):
    mnt = tmp_path / "ro"
    run = copy_run(reference.run, tmp_path)
    src, dst = shlex.quote(str(run.out)), shlex.quote(str(mnt))
    setup = f"cp -a {src}/. {dst}/ && mount -o remount,ro {dst}"
    run.config.write_text(run.config.read_text().replace(str(run.out), str(mnt)))
    proc = run.cli("--max_steps", str(MAX_STEPS + 2), prefix=on_tmpfs(mnt, 64 << 20, setup=setup))
    line = assert_one_line_error(proc)
    assert "read-only" in line and str(mnt) in line


@pytest.mark.slow
def test_read_only_logging_folder(tmp_path, packed):
    mnt = tmp_path / "ro"
    run = make_run(tmp_path, packed, logging_dir=str(mnt / "logs"))
    proc = run.cli(prefix=on_tmpfs(mnt, 1 << 20, setup=f"mount -o remount,ro {shlex.quote(str(mnt))}"))
    line = assert_one_line_error(proc)
    assert "read-only" in line and str(mnt) in line
    assert leftovers(run) == []  # the folder lock was given back


# ---- simulated ENOSPC (runs everywhere) ---------------------------------------------------------


def _model_and_opt() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 32)).sum().backward()
    opt.step()
    return model, opt


def _save(mgr, step, model, opt):
    return mgr.save(step, model=model, optimizer=opt, trainer_state={"step": step}, rank_state={"pos": step})


def test_enospc_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    mgr = CheckpointManager(tmp_path, keep_last=1)
    _save(mgr, 1, model, opt)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as e:
        _save(mgr, 2, model, opt)
    monkeypatch.undo()
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and "\n" not in msg
    assert "no space left" in msg and str(tmp_path) in msg and "checkpoint-2" in msg and "intact" in msg
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    load_checkpoint(tmp_path / "checkpoint-1", model=model, optimizer=opt)
    mgr.close()


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    mgr = CheckpointManager(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000))  # type: ignore[attr-defined]
    with pytest.raises(OSError, match=r"not enough free space .* needs about") as e:
        _save(mgr, 1, model, opt)
    assert e.value.errno == errno.ENOSPC and str(tmp_path) in str(e.value)
    assert list(tmp_path.iterdir()) == [tmp_path / ".llm_pipeline.lock"]  # nothing written
    mgr.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "code, needle",
    [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")],
)
def test_os_errors_read_as_one_actionable_line(code, needle):
    msg = explain_os_error(OSError(code, os.strerror(code), "/data/run/ckpt"), "saving checkpoint-4")
    assert msg.startswith("saving checkpoint-4: /data/run/ckpt: ") and needle in msg and "\n" not in msg
