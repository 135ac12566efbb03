"""Test-size pipeline configs shared by the pipeline tests (debug model, a small stdlib corpus)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def pipeline_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pipeline")
    write_yaml(d / "data.yaml", {
        "source": {"kind": "stdlib", "include_docs": False, "held_out_modules": [],
                   "domain_modules": ["_pyio", "abc", "argparse", "ast", "bdb"],  # the LoRA stage's domain
                   "max_bytes": 700_000, "documents_per_shard": 50},
        "clean": {"filters": "code", "executor": {"kind": "local", "tasks": 1, "workers": 1}},
        "tokenizer": {"vocab_size": 512, "min_frequency": 2},
        "pack": {"val_fraction": 0.1, "workers": 1, "domain_val_fraction": 0.25},
    })  # fmt: skip
    write_yaml(d / "pretrain.yaml", {
        "model": {"preset": "debug"},
        "data": {"path": "unused", "tokenizer_dir": "unused"},
        "training": {"max_steps": 24, "global_batch_tokens": 2048, "micro_batch_size": 16, "learning_rate": 3e-3,
                     "warmup_steps": 2, "precision": "fp32", "logging_steps": 8, "eval_steps": 12,
                     "eval_batches": 2, "save_steps": 12, "output_dir": "unused"},
        "parallel": {"device": "cpu"},
        "curriculum": [{"step": 0, "seq_len": 64}, {"step": 12, "seq_len": 128}],
    })  # fmt: skip
    write_yaml(d / "eval.yaml", {
        "tasks": ["perplexity", "mmlu"], "limit": 5, "device": "cpu",
        "perplexity": {"seq_len": 128}, "mmlu": {"source": "builtin:python"},
    })  # fmt: skip
    write_yaml(d / "lora.yaml", {
        "model": {"init_from": "unused"},
        "lora": {"r": 4},
        "data": {"packed_dir": "unused", "seq_len": 64,
                 "domain": {"kind": "tokens", "train_split": "domain", "val_split": "domain_val"},
                 "general": {"kind": "tokens", "train_split": "train", "val_split": "val"}},
        "training": {"max_steps": 8, "global_batch_tokens": 1024, "micro_batch_size": 16, "learning_rate": 1e-2,
                     "warmup_steps": 1, "precision": "fp32", "logging_steps": 4, "eval_steps": 4, "eval_batches": 2,
                     "save_steps": 0, "output_dir": "unused"},
        "parallel": {"device": "cpu"},
    })  # fmt: skip
    chat_training = {"max_steps": 6, "global_batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-3,
                     "warmup_steps": 1, "precision": "fp32", "logging_steps": 3, "eval_steps": 3, "eval_batches": 2,
                     "save_steps": 0, "output_dir": "unused"}  # fmt: skip
    write_yaml(d / "sft.yaml", {
        "model": {"init_from": "unused"},
        "data": {"kind": "stdlib", "max_seq_len": 128, "max_examples": 96, "max_val_examples": 16},
        "training": chat_training, "parallel": {"device": "cpu"},
    })  # fmt: skip
    write_yaml(d / "dpo.yaml", {
        "model": {"init_from": "unused"},
        "data": {"kind": "stdlib", "max_seq_len": 96, "max_prompt_len": 48, "max_examples": 48,
                 "max_val_examples": 16},
        "training": chat_training, "parallel": {"device": "cpu"},
        "dpo": {"beta": 0.5},
    })  # fmt: skip
    write_yaml(d / "gates.yaml", {"stages": {
        "pretrain": {"baseline_stage": "init", "rules": [
            {"metric": "perplexity.perplexity", "higher_is_better": False, "max_regression_pct": -10.0}]},
        # wiring, not quality, after a few steps at debug size: the metrics are routed, read and compared
        "sft": {"baseline_stage": "pretrain", "rules": [
            {"metric": "stage.ppl", "max": 1e6},
            {"metric": "perplexity.perplexity", "higher_is_better": False, "max_regression_pct": 50.0}]},
        "dpo": {"baseline_stage": "sft", "rules": [
            {"metric": "stage.rewards/accuracies", "min": 0.0},
            {"metric": "perplexity.perplexity", "higher_is_better": False, "max_regression_pct": 50.0}]},
        "lora": {"baseline_stage": "dpo", "rules": [
            {"metric": "stage.ppl", "baseline_metric": "stage.start.ppl", "higher_is_better": False,
             "max_regression_pct": 5.0},  # wiring, not quality: 8 steps on a 12-step base barely move it
            {"metric": "perplexity.perplexity", "higher_is_better": False, "max_regression_pct": 50.0}]},
    }})  # fmt: skip
    write_yaml(d / "pipeline.yaml", {
        "run_dir": str(d / "run"),
        "data": {"config": str(d / "data.yaml")},
        "stages": [{"name": "pretrain", "kind": "pretrain", "config": str(d / "pretrain.yaml"), "start_from": "config",
                    "gate": "pretrain"}],
        "eval": {"config": str(d / "eval.yaml")},
        "gates": str(d / "gates.yaml"),
        "generate": {"prompts": ["def "], "max_new_tokens": 8},
    })  # fmt: skip
    later = [{"name": kind, "kind": kind, "config": str(d / f"{kind}.yaml"), "start_from": "previous", "gate": kind}
             for kind in ("sft", "dpo", "lora")]  # fmt: skip
    pipeline = yaml.safe_load((d / "pipeline.yaml").read_text())
    write_yaml(d / "pipeline_all.yaml", {**pipeline, "run_dir": str(d / "run_all"), "generate": None,
                                         "stages": [*pipeline["stages"], *later]})  # fmt: skip
    return d
