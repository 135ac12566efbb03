"""The pretrain command line: spec flags map onto the config; errors are actionable; export loads in HF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_pipeline.cli import build_parser, main
from llm_pipeline.commands.train import pretrain_config_from_args
from llm_pipeline.config import ConfigError
from llm_pipeline.train.pretrain import run_pretraining

from .conftest import source, tiny_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo" / "pretrain.yaml")


def _cfg(*argv: str):
    return pretrain_config_from_args(build_parser().parse_args(["pretrain", "--config", DEMO, *argv]))


def test_spec_flags_override_the_config(tmp_path):
    cfg = _cfg(
        "--max_steps", "7", "--save_steps", "3", "--eval_steps", "5", "--logging_steps", "2",
        "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "auto",
        "--fp8", "--enable-oom-recovery", "--set", "training.learning_rate=1e-4",
    )  # fmt: skip
    t = cfg.training
    assert (t.max_steps, t.save_steps, t.eval_steps, t.logging_steps) == (7, 3, 5, 2)
    assert t.output_dir == tmp_path / "out" and t.resolved_final_dir == tmp_path / "out_final"
    assert t.resume_from_checkpoint == "auto" and t.enable_oom_recovery and t.learning_rate == 1e-4
    assert cfg.parallel.fp8 is True
    assert _cfg("--no-fp8").parallel.fp8 is False
    assert _cfg().parallel.fp8 is None  # auto


def test_config_typos_and_bad_curriculum_are_errors():
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        _cfg("--set", "training.max_stpes=3")
    with pytest.raises(ConfigError, match="multiple of every curriculum seq_len"):
        _cfg("--set", "training.global_batch_tokens=1000")


def test_fp8_on_cpu_is_a_clear_cli_error(tmp_path, capsys):
    code = main(["pretrain", "--config", DEMO, "--fp8", "--output_dir", str(tmp_path / "o")])
    assert code == 1
    assert "--no-fp8" in capsys.readouterr().err


def test_final_export_loads_in_transformers_and_starts_a_new_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(tmp_path, max_steps=2, eval_steps=2)
    result = run_pretraining(cfg, train_source=source(cfg), val_source=source(cfg, seed=1))
    assert result.final_dir == tmp_path / "ckpt_final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.final_dir)
    from llm_pipeline.checkpoint.hf import load_pretrained

    ours = load_pretrained(result.final_dir)
    ids = torch.randint(0, 512, (1, 16))
    torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)

    # model.init_from: a new run starts from the exported weights (same validation loss before its first step).
    again = tiny_config(tmp_path / "again", max_steps=1, eval_steps=1)
    again.model.init_from = result.final_dir
    follow = run_pretraining(again, train_source=source(again), val_source=source(cfg, seed=1), export=False)
    assert follow.val_losses[0] == pytest.approx(result.val_losses[2], rel=1e-6)
