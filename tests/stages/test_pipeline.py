"""The stage runner end to end at test size: data -> baseline eval -> pretrain -> eval -> gate -> generate."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml

from llm_pipeline.cli import main

from .conftest import write_yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_passes_its_gate(pipeline_files, capsys):
    d = pipeline_files
    assert main(["run", "--config", str(d / "pipeline.yaml")]) == 0
    run = d / "run"
    summary = json.loads((run / "summary.json").read_text())
    stage = summary["stages"]["pretrain"]
    assert stage["gate"]["passed"] is True and stage["status"] == "promoted"
    pointer = json.loads((run / "promoted" / "pretrain.json").read_text())
    assert pointer["model_dir"] == stage["final_dir"] and pointer["gate"]["passed"] is True
    init_ppl = summary["init_eval"]["perplexity"]["perplexity"]
    final_ppl = stage["eval"]["perplexity"]["perplexity"]
    assert final_ppl < 0.9 * init_ppl
    assert set(stage["eval_metrics"]) == {"0", "12", "24"}  # every in-training evaluation is kept
    final = Path(stage["final_dir"])
    assert final == run / "checkpoints" / "pretrain_final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert (run / "data" / "packed" / "manifest.json").is_file()
    assert isinstance(summary["generate"][0]["completion"], str)
    card = (run / "report" / "summary.md").read_text()
    assert "pretrain" in card and (run / "report" / "report.html").read_text().count("data:image/png;base64") >= 2


@pytest.mark.slow
def test_blocked_gate_stops_the_pipeline_with_exit_3(pipeline_files, capsys):
    d = pipeline_files
    write_yaml(
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
    err = capsys.readouterr().err
    assert "pretrain gate blocked" in err
    assert "perplexity.perplexity = " in err and "> max 1" in err  # the rule, the value, by how much
    summary = json.loads((d / "run" / "summary.json").read_text())
    assert summary["stages"]["pretrain"]["status"] == "blocked"
    assert not (d / "run" / "promoted" / "pretrain.json").exists()  # the earlier promotion no longer holds


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_all_four_stages_run_in_order_each_from_the_last_promoted_model(pipeline_files):
    """pretrain -> sft -> dpo -> lora at debug size, each evaluated and gated against the stage it started
    from: every stage starts from the previous export, its held-out metrics reach results.json (stage.*),
    each gate reads its baseline, the exports load in transformers (and peft), and the report covers all."""
    d = pipeline_files
    pretrain = "stages.pretrain.set=[training.max_steps=12, training.eval_steps=12, training.save_steps=12]"
    assert main(["run", "--config", str(d / "pipeline_all.yaml"), "--set", pretrain]) == 0
    run = d / "run_all"
    summary = json.loads((run / "summary.json").read_text())
    order = ["pretrain", "sft", "dpo", "lora"]
    assert list(summary["stages"]) == order
    for prev, name in itertools.pairwise(order):
        stage = summary["stages"][name]
        assert stage["status"] == "promoted" and stage["gate"]["passed"] is True, name
        assert (run / "promoted" / f"{name}.json").is_file()
        cfg = yaml.safe_load((run / "checkpoints" / name / "config.yaml").read_text())
        assert cfg["model"]["init_from"] == summary["stages"][prev]["final_dir"], name  # the last promoted model
        compared = [r for r in stage["gate"]["rules"] if r["metric"] == "perplexity.perplexity"]
        assert compared and all(r["baseline_of"] == f"{prev}_final" and r["baseline"] > 1 for r in compared), name

    sft = json.loads((run / "evals" / "sft_final" / "results.json").read_text())["metrics"]
    assert sft["stage"]["ppl"] > 1 and sft["perplexity"]["status"] == "ok"
    assert (run / "checkpoints" / "sft_final" / "chat_template.jinja").is_file()
    dpo = json.loads((run / "evals" / "dpo_final" / "results.json").read_text())["metrics"]
    assert 0.0 <= dpo["stage"]["rewards/accuracies"] <= 1.0 and "rewards/margins" in dpo["stage"]
    assert (run / "checkpoints" / "dpo" / "reference").is_dir()  # the SFT model's cached log-probs

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "lora_final")
    base = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "dpo_final")
    adapted = PeftModel.from_pretrained(base, run / "checkpoints" / "lora_final_adapter").merge_and_unload()
    for (n, p), (_, q) in zip(merged.state_dict().items(), adapted.state_dict().items(), strict=True):
        assert torch.allclose(p.float(), q.float(), atol=1e-2), n  # bf16 base + fp32 delta, rounded on export

    lora = summary["stages"]["lora"]
    assert lora["exports"] == {
        "adapter": str(run / "checkpoints" / "lora_final_adapter"), "model": str(run / "checkpoints" / "lora_final")
    }  # fmt: skip
    cfg = yaml.safe_load((run / "checkpoints" / "lora" / "config.yaml").read_text())
    assert cfg["data"]["packed_dir"] == str(run / "data" / "packed")
    metrics = json.loads((run / "evals" / "lora_final" / "results.json").read_text())["metrics"]
    stage = metrics["stage"]
    assert {"ppl", "general/ppl"} <= set(stage) and {"ppl", "general/ppl"} <= set(stage["start"])
    rules = {r["metric"]: r for r in lora["gate"]["rules"]}
    assert rules["stage.ppl"]["value"] == stage["ppl"] and rules["perplexity.perplexity"]["passed"]
    card = (run / "report" / "summary.md").read_text()
    assert all(f"| {name}" in card for name in order), card

    # --only a middle stage: everything is up to date, and the samples come from that stage's export,
    # not from a later stage's recorded one
    gen = "generate={prompts: ['def '], max_new_tokens: 4}"
    args = ["run", "--config", str(d / "pipeline_all.yaml"), "--set", pretrain, "--set", gen]
    assert main([*args, "--only", "sft"]) == 0
    samples = json.loads((run / "summary.json").read_text())["generate"]
    assert [s["model"] for s in samples] == [summary["stages"]["sft"]["final_dir"]]
    # the same rule with a demand the run does not meet names the within-stage baseline
    from llm_pipeline.gates import GateRule, StageGate, evaluate_gate, load_results

    strict = StageGate(rules=[GateRule(metric="stage.ppl", baseline_metric="stage.start.ppl",
                                       higher_is_better=False, max_regression_pct=-90.0)])  # fmt: skip
    verdict = evaluate_gate("lora", strict, load_results(run / "evals" / "lora_final"))
    assert not verdict.passed and f"vs stage.start.ppl {stage['start']['ppl']:.4g}" in verdict.results[0].reason
    assert 0.5 < lora["stats"]["mix_domain_row_fraction"] < 1.0  # 8 steps x 16 rows at 0.8
