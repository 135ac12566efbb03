"""bench/gpu_check.py stays runnable: its argument handling and every mode's code path, on CPU (--dry-run)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_unknown_mode_is_refused_before_any_work(gpu_check):
    with pytest.raises(SystemExit, match="unknown mode 'fp4'; choose from bf16, bf16\\+compile"):
        gpu_check.parse_args(["--modes", "bf16,fp4"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_so(gpu_check, capsys):
    assert gpu_check.main(["--modes", "bf16"]) == 2
    assert "no CUDA GPU visible" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_runs_every_mode_on_cpu(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("llm_pipeline.train.metrics._cpu_peak", lambda dtype: 1e9)  # no matmul benchmark
    out = tmp_path / "r.json"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    got = json.loads(out.read_text())["results"]
    assert [r["mode"].split(" ")[0] for r in got] == list(gpu_check.MODES)
    assert all(r["tokens_per_s_per_gpu"] > 0 and math.isfinite(r["loss"]) for r in got)
    text = capsys.readouterr().out
    assert "fp8-rowwise+compile [fp8 emulated, compile skipped]" in text
    assert "torchtitan 8B 6,667" in text and "torchtitan 8B 8,532" in text
    assert "target bf16 MFU >= 45%" in text and "torchtitan: 1.28x" in text
