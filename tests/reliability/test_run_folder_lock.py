"""A lock covers the folders below its own: a run folder in use refuses locks inside it, except to the processes
the run started itself (its token), and a dead run's lock is no obstacle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_pipeline.checkpoint.lock import TOKEN_ENV, FolderLock, FolderLocked, live_owner, read_lock

from .conftest import cli_env

pytestmark = pytest.mark.slow  # each test holds a lock from a second process

HOLD = "import sys, time; from llm_pipeline.checkpoint.lock import FolderLock; FolderLock(sys.argv[1], purpose='pipeline run').acquire(); print('held', flush=True); time.sleep(600)"  # noqa: E501


@pytest.fixture
def held(tmp_path: Path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=cli_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_lock_inside_a_run_folder_in_use_is_refused_naming_the_run(held):
    run, proc = held
    stage = run / "checkpoints" / "sft"
    with pytest.raises(FolderLocked) as e:
        FolderLock(stage, purpose="sft stage").acquire()
    assert f"inside {run}" in str(e.value) and f"pid {proc.pid}" in str(e.value) and "pipeline run" in str(e.value)
    assert f"kill {proc.pid}" in str(e.value)
    assert not stage.exists()  # refused before the folder was even made
    owner = live_owner(stage)  # what ckpt cleanup and restore check
    assert owner is not None and owner.pid == proc.pid


def test_the_runs_own_workers_may_lock_inside_it(held, monkeypatch):
    run, _ = held
    owner = read_lock(run)
    assert owner is not None
    monkeypatch.setenv(TOKEN_ENV, owner.token)
    with FolderLock(run / "checkpoints" / "sft", purpose="sft stage"):
        pass


def test_a_dead_runs_lock_does_not_hold_the_folders_below(held):
    run, proc = held
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.05)
    assert live_owner(run / "checkpoints" / "sft") is None
    with FolderLock(run / "checkpoints" / "sft"):
        pass
