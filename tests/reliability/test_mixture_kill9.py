"""A 3-source pretraining mixture killed with -9 in the middle of a save, then the same command again: the
very same losses, realised shares and per-source held-out losses as an undisturbed run (the mixer's position
and per-source counts live in the checkpoint), across a curriculum boundary."""

from __future__ import annotations

import json
import signal

import pytest

from .conftest import MAX_STEPS, Run, make_run

pytestmark = pytest.mark.slow  # subprocess training runs with kill -9

SHARES = {"web": 0.5, "code": 0.3, "math": 0.2}


def _mixture_run(root, packed) -> Run:
    sources = [
        {"name": "web", "weight": 0.5, "val_split": "val"},
        {"name": "code", "weight": 0.3, "train_split": "val"},
        {"name": "math", "weight": 0.2},
    ]
    return make_run(root, packed, data={"val_split": None, "sources": sources}, eval_steps=4, eval_batches=2)


def _rows(run: Run, split: str) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run.logs / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in rows if r["split"] == split}


def test_kill9_mid_run_resumes_the_same_mixture_stream(tmp_path, packed):
    ref = _mixture_run(tmp_path / "ref", packed)
    proc = ref.cli()
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = _mixture_run(tmp_path / "run", packed)
    proc = run.cli(fault="kill-on-fsync:.tmp-checkpoint-6")  # after the curriculum switch; resumes from 4
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = run.cli()
    assert proc.returncode == 0, proc.stderr[-3000:]

    want, got = _rows(ref, "train"), _rows(run, "train")
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    assert {s: r["loss"] for s, r in got.items()} == {s: r["loss"] for s, r in want.items()}  # bit-identical
    for name in SHARES:
        assert got[MAX_STEPS][f"mix/{name}/share"] == want[MAX_STEPS][f"mix/{name}/share"]
    evals = _rows(run, "eval")
    assert evals[MAX_STEPS]["web/loss"] == _rows(ref, "eval")[MAX_STEPS]["web/loss"]
    assert evals[MAX_STEPS]["loss"] == evals[MAX_STEPS]["web/loss"]  # the only held-out source
