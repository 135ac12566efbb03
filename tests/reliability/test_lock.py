"""One run per output folder: a second run stops with a message naming the first one's pid; the lock of
a run that died (kill -9) is taken over, so a crashed run can always be resumed (every resume after a
kill -9 in test_kill9.py takes over such a lock; ``test_named_kill_points_in_one_run`` checks it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from llm_pipeline.checkpoint.lock import LOCK_FILE, FolderLock, FolderLocked, read_lock

from .conftest import Reference, assert_one_line_error, assert_reproduces, leftovers, make_run


def _wait_for(path, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_second_run_on_a_folder_in_use_is_refused(tmp_path, packed, reference: Reference):
    run = make_run(tmp_path, packed)
    release = tmp_path / "release"
    first = run.popen(fault=f"pause-at-step:3:{release}")
    try:
        _wait_for(tmp_path / "release.ready", first)
        second = run.cli()
        line = assert_one_line_error(second)
        assert f"pid {first.pid}" in line and str(run.out) in line and "in use" in line
        assert "completed" not in second.stdout
    finally:
        release.touch()
        _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err[-3000:]
    assert_reproduces(run, reference)  # the refused run changed nothing
    assert leftovers(run) == []


# ---- the lock API, reusable by any command ---------------------------------------------------


@pytest.mark.slow
def test_context_manager_and_message_of_a_live_owner(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from llm_pipeline.checkpoint.lock import FolderLock;"
         f"FolderLock({str(tmp_path)!r}, purpose='export').acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLocked, match=rf"in use by pid {holder.pid} .*export"):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path, purpose="test") as lock:  # the dead holder's lock is stale now
        assert lock.held and read_lock(tmp_path).pid == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_reused_pid_is_not_mistaken_for_the_owner(tmp_path):
    """A lock naming a live pid whose process started at another time (pid reuse) is stale."""
    FolderLock(tmp_path).acquire()
    data = json.loads((tmp_path / LOCK_FILE).read_text())
    data.update(pid=1, start_time=(data["start_time"] or 0) + 12345)  # pid 1 is alive, started earlier
    (tmp_path / LOCK_FILE).write_text(json.dumps(data))
    FolderLock(tmp_path).acquire()
    assert read_lock(tmp_path).pid == os.getpid()


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    FolderLock(tmp_path).acquire()
    data = json.loads((tmp_path / LOCK_FILE).read_text())
    data.update(host="gpu-node-17", pid=4242)
    (tmp_path / LOCK_FILE).write_text(json.dumps(data))
    with pytest.raises(FolderLocked, match=r"pid 4242 on gpu-node-17.*delete .*\.llm_pipeline\.lock"):
        FolderLock(tmp_path).acquire()


def test_release_leaves_someone_elses_lock_alone(tmp_path):
    first = FolderLock(tmp_path).acquire()
    second = FolderLock(tmp_path).acquire()  # same process: takes it over
    first.release()
    assert read_lock(tmp_path).token == second.owner.token
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()
