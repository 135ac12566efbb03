"""The stage runner end to end at test size: data -> baseline eval -> pretrain -> eval -> gate -> generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llm_pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def pipeline_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pipeline")
    _yaml(d / "data.yaml", {
        "source": {"kind": "stdlib", "include_docs": False, "held_out_modules": [],
                   "max_bytes": 700_000, "documents_per_shard": 50},
        "clean": {"filters": "code", "executor": {"kind": "local", "tasks": 1, "workers": 1}},
        "tokenizer": {"vocab_size": 512, "min_frequency": 2},
        "pack": {"val_fraction": 0.1, "workers": 1},
    })  # fmt: skip
    _yaml(d / "pretrain.yaml", {
        "model": {"preset": "debug"},
        "data": {"path": "unused", "tokenizer_dir": "unused"},
        "training": {"max_steps": 24, "global_batch_tokens": 2048, "micro_batch_size": 16, "learning_rate": 3e-3,
                     "warmup_steps": 2, "precision": "fp32", "logging_steps": 8, "eval_steps": 12,
                     "eval_batches": 2, "save_steps": 12, "output_dir": "unused"},
        "parallel": {"device": "cpu"},
        "curriculum": [{"step": 0, "seq_len": 64}, {"step": 12, "seq_len": 128}],
    })  # fmt: skip
    _yaml(d / "eval.yaml", {
        "tasks": ["perplexity", "mmlu"], "limit": 5, "device": "cpu",
        "perplexity": {"seq_len": 128}, "mmlu": {"source": "builtin:python"},
    })  # fmt: skip
    _yaml(d / "gates.yaml", {"stages": {"pretrain": {"baseline_stage": "init", "rules": [
        {"metric": "perplexity.perplexity", "higher_is_better": False, "max_regression_pct": -10.0},
    ]}}})  # fmt: skip
    _yaml(d / "pipeline.yaml", {
        "run_dir": str(d / "run"),
        "data": {"config": str(d / "data.yaml")},
        "stages": [{"name": "pretrain", "kind": "pretrain", "config": str(d / "pretrain.yaml"), "start_from": "config",
                    "gate": "pretrain"}],
        "eval": {"config": str(d / "eval.yaml")},
        "gates": str(d / "gates.yaml"),
        "generate": {"prompts": ["def "], "max_new_tokens": 8},
    })  # fmt: skip
    return d


def test_pipeline_runs_every_stage_and_passes_its_gate(pipeline_files, capsys):
    d = pipeline_files
    assert main(["run", "--config", str(d / "pipeline.yaml")]) == 0
    run = d / "run"
    summary = json.loads((run / "summary.json").read_text())
    stage = summary["stages"]["pretrain"]
    assert stage["gate"]["passed"] is True
    init_ppl = summary["init_eval"]["perplexity"]["perplexity"]
    final_ppl = stage["eval"]["perplexity"]["perplexity"]
    assert final_ppl < 0.9 * init_ppl
    assert set(stage["eval_metrics"]) == {"0", "12", "24"}  # every in-training evaluation is kept
    final = Path(stage["final_dir"])
    assert final == run / "checkpoints" / "pretrain_final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert (run / "data" / "packed" / "manifest.json").is_file()
    assert isinstance(summary["generate"][0]["completion"], str)


def test_blocked_gate_stops_the_pipeline_with_exit_3(pipeline_files, capsys):
    d = pipeline_files
    _yaml(
        d / "strict_gates.yaml", {"stages": {"pretrain": {"rules": [{"metric": "perplexity.perplexity", "max": 1.0}]}}}
    )
    code = main(
        [
            "run",
            "--config",
            str(d / "pipeline.yaml"),
            "--set",
            f"gates={d / 'strict_gates.yaml'}",
            "--set",
            "generate=null",
        ]
    )
    assert code == 3
    assert "pretrain gate blocked" in capsys.readouterr().err


def test_shipped_pipeline_configs_point_at_valid_stage_configs():
    from llm_pipeline.config import load_config
    from llm_pipeline.data.config import DataConfig
    from llm_pipeline.eval.config import EvalConfig
    from llm_pipeline.gates import GatesConfig
    from llm_pipeline.pipeline import PipelineConfig
    from llm_pipeline.train.stage import stage_class

    for name in ("configs/pipeline.yaml", "configs/demo/pipeline.yaml"):
        cfg = load_config(PipelineConfig, ROOT / name)
        for ref, schema in ((cfg.data, DataConfig), (cfg.eval, EvalConfig)):
            assert ref is not None
            load_config(schema, ROOT / ref.config, ref.set)
        assert cfg.stages, name
        for entry in cfg.stages:
            load_config(stage_class(entry.kind).config_class, ROOT / entry.config, entry.set)
        assert cfg.gates is not None
        load_config(GatesConfig, ROOT / cfg.gates)


def test_pretraining_as_torchrun_workers(pipeline_files):
    """nproc_per_node > 1: pretraining runs as 2 FSDP2 workers (gloo on CPU); the other stages stay in-process."""
    d = pipeline_files
    run_dir = d / "run2"
    code = main([
        "run", "--config", str(d / "pipeline.yaml"), "--run-dir", str(run_dir),
        "--set", "stages.pretrain.nproc_per_node=2",
        "--set", "stages.pretrain.set=[training.max_steps=4, training.eval_steps=0, training.save_steps=4]",
        "--set", "evaluate_start=false", "--set", "gates=null", "--set", "generate=null",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"]["pretrain"]["nproc_per_node"] == 2
    meta = json.loads((run_dir / "checkpoints" / "pretrain" / "checkpoint-4" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert summary["stages"]["pretrain"]["eval"]["perplexity"]["status"] == "ok"
