"""The stage registry: a kind defined in the tests (one module + ``register_stage_kind``) runs through pre-flight,
the pipeline (fingerprint, gate, promotion), export and the report with no change elsewhere; the stages own what
pre-flight asks (LoRA's checkpoint size, its data) and their start model's identity."""

from __future__ import annotations

import json

import pytest
import yaml

from llm_pipeline.checkpoint.hf import load_pretrained
from llm_pipeline.cli import main
from llm_pipeline.preflight import run_preflight
from llm_pipeline.train import stage as stage_mod
from llm_pipeline.train.stage import register_stage_kind

from .arith_stage import arith_config_dict, write_examples
from .chat_fixtures import make_chat_model, train_chat_tokenizer


@pytest.fixture
def arith_kind():
    register_stage_kind("arith", f"{__package__}.arith_stage:ArithStage", "arithmetic progressions (a test kind)")
    yield "arith"
    stage_mod.STAGE_KINDS.pop("arith", None)
    stage_mod.STAGE_SUMMARIES.pop("arith", None)


def _checks(checks, name):
    return [c for c in checks if c.name == name]


def test_register_refuses_a_malformed_target_and_a_non_stage():
    with pytest.raises(ValueError, match=r"package\.module:Class"):
        register_stage_kind("bad", "no_colon_here", "x")
    register_stage_kind("notastage", "llm_pipeline.config:ModelConfig", "x")
    try:
        with pytest.raises(TypeError, match="is not a Stage subclass"):
            stage_mod.stage_class("notastage")
    finally:
        stage_mod.STAGE_KINDS.pop("notastage")
        stage_mod.STAGE_SUMMARIES.pop("notastage")


def test_a_registered_test_kind_is_checked_by_preflight_through_its_own_hooks(tmp_path, arith_kind):
    cfg = arith_config_dict(tmp_path / "examples.jsonl", output_dir=str(tmp_path / "out"))
    (tmp_path / "arith.yaml").write_text(yaml.safe_dump(cfg))
    missing = run_preflight(tmp_path / "arith.yaml", kind="arith")
    data = _checks(missing, "data: arith")[0]
    assert data.status == "BLOCKER" and str(tmp_path / "examples.jsonl") in data.detail
    write_examples(tmp_path / "examples.jsonl")
    ok = run_preflight(tmp_path / "arith.yaml", kind="arith")
    assert _checks(ok, "data: arith")[0].status == "ok"
    mem = _checks(ok, "memory: arith")[0]
    assert mem.status == "ok" and "x 18 tokens" in mem.detail  # its own row length, not the model's context


@pytest.mark.slow
def test_a_registered_test_kind_runs_through_the_pipeline_export_and_report(tmp_path, arith_kind):
    tok = train_chat_tokenizer(tmp_path / "tok")
    base = make_chat_model(tmp_path / "base", tok)
    examples = write_examples(tmp_path / "examples.jsonl")
    (tmp_path / "arith.yaml").write_text(yaml.safe_dump(arith_config_dict(examples)))
    (tmp_path / "text.txt").write_text("the value of the list returns the items of the code " * 40)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({
        "tasks": ["perplexity"], "limit": 4, "device": "cpu",
        "perplexity": {"files": [str(tmp_path / "text.txt")], "seq_len": 64},
    }))  # fmt: skip
    (tmp_path / "gates.yaml").write_text(yaml.safe_dump({"stages": {"arith": {"rules": [
        {"metric": "perplexity.perplexity", "max": 1e9}]}}}))  # fmt: skip
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "eval": {"config": str(tmp_path / "eval.yaml")}, "evaluate_start": False,
        "gates": str(tmp_path / "gates.yaml"), "generate": None,
        "stages": [{"name": "arith", "kind": "arith", "config": str(tmp_path / "arith.yaml"), "start_from": str(base),
                    "gate": "arith"}],
    }))  # fmt: skip
    pre = run_preflight(tmp_path / "pipeline.yaml")
    assert not [c for c in pre if c.status == "BLOCKER" and c.name != "disk"], pre
    assert _checks(pre, "data: arith")[0].status == "ok"

    run = tmp_path / "run"
    assert main(["run", "--config", str(tmp_path / "pipeline.yaml")]) == 0
    record = json.loads((run / "summary.json").read_text())["stages"]["arith"]
    assert record["kind"] == "arith" and record["status"] == "promoted" and record["inputs_fingerprint"]
    assert json.loads((run / "promoted" / "arith.json").read_text())["stage"] == "arith"
    assert load_pretrained(run / "checkpoints" / "arith_final").config.vocab_size == 512

    # a second run: the fingerprint finds it up to date
    assert main(["run", "--config", str(tmp_path / "pipeline.yaml")]) == 0
    assert json.loads((run / "summary.json").read_text())["stages"]["arith"]["fingerprint"] == record["fingerprint"]

    # export of one of its training checkpoints, loaded through the registry
    ckpt = run / "checkpoints" / "arith" / "checkpoint-4"
    assert main(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    assert load_pretrained(tmp_path / "exported").config.num_hidden_layers == 2

    assert main(["report", str(run)]) == 0
    card = (run / "report" / "summary.md").read_text()
    assert "arith" in card and "promoted" in card
