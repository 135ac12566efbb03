"""Signals: SIGTERM (what Slurm sends before a preemption) and a first Ctrl-C save and exit 75, and the
run resumes exactly; Ctrl-C outside training exits 130 with one line, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import Reference, assert_checkpoints_valid, assert_reproduces, cli_env, leftovers, make_run

pytestmark = pytest.mark.slow  # subprocess training runs with kill -9 / signals

EXIT_PREEMPTED = 75


def test_sigterm_saves_exits_75_and_resumes_exactly(tmp_path, packed, reference: Reference):
    run = make_run(tmp_path, packed)
    proc = run.cli(fault="signal-at-step:3:SIGTERM")
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert 3 in assert_checkpoints_valid(run)  # saved at the step boundary, off the save_steps cadence
    proc = run.cli()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert leftovers(run) == []
    assert_reproduces(run, reference)


def test_ctrl_c_during_training_saves_like_sigterm(tmp_path, packed, reference: Reference):
    run = make_run(tmp_path, packed)
    proc = run.cli(fault="signal-at-step:3:SIGINT")
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert 3 in assert_checkpoints_valid(run)
    proc = run.cli()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_reproduces(run, reference)


def test_ctrl_c_outside_training_exits_130_in_one_line(tmp_path):
    """``data download`` blocked reading a FIFO (a slow network share, say) is interrupted by Ctrl-C."""
    fifo = tmp_path / "stuck.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_pipeline", "data", "download", "--no-progress", "--output-dir", str(out),
         "--set", "source.kind=local", "--set", f"source.paths=[{fifo}]"],
        env=cli_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out / "raw" / "rejects.jsonl").exists():  # created just before the source is read
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: interrupted"
    ]
