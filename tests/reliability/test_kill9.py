"""kill -9 anywhere (training, inside a save, during pruning, during the final export), then the same
command again: losses and final weights bit-identical to an undisturbed run, nothing left behind, and
no folder that looks like a committed checkpoint is ever incomplete."""

from __future__ import annotations

import random
import signal
import socket

import pytest

from llm_pipeline.checkpoint.lock import read_lock

from .conftest import MAX_STEPS, Reference, assert_checkpoints_valid, assert_reproduces, leftovers, make_run

pytestmark = pytest.mark.slow  # subprocess training runs with kill -9 / signals

KILLED = -signal.SIGKILL


def test_named_kill_points_in_one_run(tmp_path, packed, reference: Reference):
    """One run killed five times at the worst moments, resumed after each with the same command."""
    run = make_run(tmp_path, packed)
    chain = [
        # checkpoint-4 half written (its first fsync): checkpoint-2 must stay the newest valid one
        ("kill-on-fsync:.tmp-checkpoint-4", [2]),
        # pruning checkpoint-2 after committing checkpoint-6: half its files deleted, then kill -9
        ("kill-in-rmtree:checkpoint-2", [4, 6]),
        # checkpoint-8 complete with its commit marker, killed before the rename that publishes it
        ("kill-on-rename:.tmp-checkpoint-8", [4, 6]),
        # the final HF export half written
        ("kill-in-export", [6, 8]),
    ]
    dead_owner = None
    for fault, valid_after in chain:
        proc = run.cli(fault=fault)
        assert proc.returncode == KILLED, f"{fault}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        if dead_owner is not None:  # the previous kill -9 left its lock; this run took it over
            assert f"stale lock of pid {dead_owner.pid}" in proc.stderr, proc.stderr[-2000:]
        dead_owner = read_lock(run.out)
        assert dead_owner is not None and dead_owner.host == socket.gethostname(), fault
        assert assert_checkpoints_valid(run) == valid_after, fault
    proc = run.cli()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"stale lock of pid {dead_owner.pid}" in proc.stderr
    assert assert_checkpoints_valid(run) == [6, 8]
    assert leftovers(run) == []
    assert_reproduces(run, reference)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync-save", "async-save"])
def test_random_kill_point(tmp_path, packed, reference: Reference, async_save):
    """kill -9 at a random event of a run (most events are inside saves and the export), then resume.

    The point is drawn from a fixed seed, so a failure reproduces; the message names it.
    """
    n = random.Random(7 + async_save).randint(1, reference.events)
    run = make_run(tmp_path, packed, async_save=async_save)
    proc = run.cli(fault=f"kill-at-event:{n}")
    assert proc.returncode in (KILLED, 0), f"kill at event {n}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    assert_checkpoints_valid(run)
    proc = run.cli()
    assert proc.returncode == 0, f"after a kill at event {n}:\n{proc.stderr[-3000:]}"
    assert leftovers(run) == [], f"kill at event {n}"
    assert_reproduces(run, reference)


def test_kill_while_replacing_the_previous_export(tmp_path, packed, reference: Reference):
    """A finished run launched again re-exports; kill -9 right after the old export is moved aside."""
    from .conftest import copy_run

    run = copy_run(reference.run, tmp_path)
    proc = run.cli(fault="kill-after-rename:.ckpt_final.old-")
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    proc = run.cli()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert leftovers(run) == []
    assert (run.final / "model.safetensors").read_bytes() == reference.weights
    assert assert_checkpoints_valid(run) == [MAX_STEPS - 2, MAX_STEPS]
