"""A 3-source pretraining mixture killed with -9 in the middle of a save, then the same command again: the
very same losses, realised shares and per-source held-out losses as an undisturbed run (the mixer's position
and per-source counts live in the checkpoint), across a curriculum boundary."""

from __future__ import annotations

import json
import signal

import pytest
import yaml

from .conftest import MAX_STEPS, Run

pytestmark = pytest.mark.slow  # subprocess training runs with kill -9

SHARES = {"web": 0.5, "code": 0.3, "math": 0.2}


def _mixture_run(root, packed) -> Run:
    data, tok = packed
    cfg = {
        "model": {"preset": "debug"},
        "data": {
            "path": str(data),
            "tokenizer_dir": str(tok),
            "val_split": None,
            "sources": [
                {"name": "web", "weight": 0.5, "val_split": "val"},
                {"name": "code", "weight": 0.3, "train_split": "val"},
                {"name": "math", "weight": 0.2},
            ],
        },
        "training": {
            "max_steps": MAX_STEPS, "global_batch_tokens": 256, "micro_batch_size": 4, "learning_rate": 3e-3,
            "warmup_steps": 2, "precision": "fp32", "logging_steps": 1, "eval_steps": 4, "eval_batches": 2,
            "save_steps": 2, "save_total_limit": 2, "output_dir": str(root / "ckpt"),
            "logging_dir": str(root / "logs"), "resume_from_checkpoint": "auto",
        },
        "parallel": {"device": "cpu"},
        "curriculum": [{"step": 0, "seq_len": 32}, {"step": 4, "seq_len": 64}],
    }  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    path = root / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Run(root, path)


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
