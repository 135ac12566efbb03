"""Shared helpers for the training tests: a tiny config and a run on the synthetic token stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llm_pipeline.train.config import PretrainConfig

from .synthetic import SyntheticTokenSource


def pytest_configure(config: pytest.Config) -> None:
    # DCP on one process without a process group is intended (see llm_pipeline.checkpoint.dcp).
    config.addinivalue_line("filterwarnings", "ignore:torch.distributed is disabled:UserWarning")


def tiny_config(tmp_path: Path, curriculum: list[dict[str, int]] | None = None, **training: Any) -> PretrainConfig:
    """debug preset, fp32, 4 rows of 32 tokens per step: a step takes milliseconds on CPU."""
    train = {
        "max_steps": 8,
        "global_batch_tokens": 128,
        "micro_batch_size": 2,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "precision": "fp32",
        "logging_steps": 2,
        "eval_steps": 0,
        "eval_batches": 2,
        "save_steps": 0,
        "output_dir": str(tmp_path / "ckpt"),
        "logging_dir": str(tmp_path / "logs"),
    }
    train.update(training)
    return PretrainConfig.model_validate(
        {
            "model": {"preset": "debug"},
            "training": train,
            "parallel": {"device": "cpu", "fp8": False},
            "curriculum": curriculum or [{"step": 0, "seq_len": 32}],
        }
    )


def source(cfg: PretrainConfig, **kw: Any) -> SyntheticTokenSource:
    return SyntheticTokenSource(seq_len=cfg.curriculum[0].seq_len, micro_batch_size=cfg.training.micro_batch_size, **kw)


@pytest.fixture
def make_config():
    return tiny_config
