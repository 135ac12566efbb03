"""Promotion gates as a pure function: no model needed."""

from __future__ import annotations

import json

import pytest

from llm_pipeline.cli import main
from llm_pipeline.config import ConfigError
from llm_pipeline.gates import GateRule, StageGate, evaluate_gate, flatten_metrics

GATE = StageGate(
    rules=[
        GateRule(metric="mmlu.accuracy", min=0.3),
        GateRule(metric="perplexity.perplexity", max=20.0, higher_is_better=False, max_regression_pct=10.0),
        GateRule(metric="safety.refusal_rate", min=0.9, max_regression=0.02),
    ]
)
BASE = {"mmlu.accuracy": 0.31, "perplexity.perplexity": 10.0, "safety.refusal_rate": 0.95}


def test_all_rules_pass():
    m = {"mmlu.accuracy": 0.35, "perplexity.perplexity": 10.5, "safety.refusal_rate": 0.94}
    v = evaluate_gate("sft", GATE, m, BASE)
    assert v.passed and all(r.reason == "ok" for r in v.results)


def test_each_failure_is_explained():
    m = {"mmlu.accuracy": 0.25, "perplexity.perplexity": 11.5, "safety.refusal_rate": 0.92}
    v = evaluate_gate("sft", GATE, m, BASE)
    assert not v.passed
    reasons = {r.metric: r.reason for r in v.results}
    assert "< min 0.3" in reasons["mmlu.accuracy"]
    assert "15.00%" in reasons["perplexity.perplexity"]
    assert "regressed by 0.03" in reasons["safety.refusal_rate"]


def test_missing_or_timed_out_metric_fails():
    m = {"mmlu.status": "timed_out", "perplexity.perplexity": 9.0, "safety.refusal_rate": 0.99}
    v = evaluate_gate("sft", GATE, m, BASE)
    mmlu = v.results[0]
    assert not mmlu.passed and "timed out" in mmlu.reason
    v = evaluate_gate("sft", GATE, {}, BASE)
    assert not v.passed and all("missing" in r.reason for r in v.results)


def test_regression_rule_without_baseline_fails():
    v = evaluate_gate("sft", StageGate(rules=[GateRule(metric="a", max_regression=0.1)]), {"a": 1.0}, None)
    assert not v.passed and "no baseline" in v.results[0].reason


def test_rule_without_bound_is_a_config_error():
    with pytest.raises(ValueError, match="sets no bound"):
        GateRule(metric="x")


def test_flatten():
    assert flatten_metrics({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_cli_exit_codes(tmp_path, capsys):
    cfg = tmp_path / "gates.yaml"
    cfg.write_text("stages:\n  pretrain:\n    rules:\n      - {metric: perplexity.perplexity, max: 50}\n")
    (tmp_path / "evals" / "pretrain_final").mkdir(parents=True)
    res = tmp_path / "evals" / "pretrain_final" / "results.json"
    res.write_text(json.dumps({"perplexity": {"perplexity": 40.0, "status": "ok"}}))
    args = ["gates", "pretrain", "--evals-dir", str(tmp_path / "evals"), "--config", str(cfg)]
    assert main(args) == 0
    res.write_text(json.dumps({"perplexity": {"perplexity": 60.0}}))
    assert main(args) == 3
    assert "BLOCKED" in capsys.readouterr().out
    cfg.write_text("stages:\n  pretrain:\n    rules:\n      - {metric: x, mn: 1}\n")
    with pytest.raises(ConfigError, match="mn"):
        from llm_pipeline.gates import check_gate

        check_gate("pretrain", res, config=cfg)


def test_results_given_as_the_file_or_its_folder_find_the_same_baseline(tmp_path):
    """`gates STAGE --results evals/sft_final/results.json` (the file, as --help allows) reads the baseline
    stage's results beside that folder, as the folder form does."""
    from llm_pipeline.gates import check_gate

    cfg = tmp_path / "gates.yaml"
    cfg.write_text("stages:\n  sft:\n    baseline_stage: pretrain\n    rules:\n"
                   "      - {metric: ppl, higher_is_better: false, max_regression_pct: 10}\n")  # fmt: skip
    for stage, ppl in (("pretrain", 40.0), ("sft", 42.0)):
        (tmp_path / "evals" / f"{stage}_final").mkdir(parents=True)
        (tmp_path / "evals" / f"{stage}_final" / "results.json").write_text(json.dumps({"metrics": {"ppl": ppl}}))
    folder = tmp_path / "evals" / "sft_final"
    for results in (folder, folder / "results.json"):
        verdict = check_gate("sft", results, config=cfg)
        assert verdict.passed and verdict.results[0].baseline == 40.0, results


def test_baseline_metric_without_a_regression_bound_is_a_config_error():
    """baseline_metric only feeds max_regression / max_regression_pct: alone with min/max it would be ignored."""
    with pytest.raises(ValueError, match="baseline_metric"):
        GateRule(metric="stage.ppl", baseline_metric="stage.start.ppl", max=100.0)


def test_negative_regression_means_required_improvement():
    gate = StageGate(rules=[GateRule(metric="ppl", higher_is_better=False, max_regression_pct=-50.0)])
    assert evaluate_gate("pretrain", gate, {"ppl": 40.0}, {"ppl": 100.0}).passed
    v = evaluate_gate("pretrain", gate, {"ppl": 60.0}, {"ppl": 100.0})
    assert not v.passed and "-40.00%" in v.results[0].reason


def test_zero_baseline_empty_gate_and_infinite_values_never_pass():
    pct = StageGate(rules=[GateRule(metric="a", max_regression_pct=5.0)])
    v = evaluate_gate("x", pct, {"a": 0.0}, {"a": 0.0})
    assert not v.passed and "baseline of 0" in v.results[0].reason
    with pytest.raises(ValueError):
        StageGate(rules=[])
    v = evaluate_gate("x", StageGate(rules=[GateRule(metric="a", max=10.0)]), {"a": float("-inf")})
    assert not v.passed and "finite" in v.results[0].reason


def test_baseline_metric_compares_within_the_stage_own_results(tmp_path):
    """A stage's held-out score after training against the same data scored before its first step
    (what the pipeline routes as stage.start.*): no baseline stage's results are read."""
    gate = StageGate(
        baseline_stage="pretrain",
        rules=[GateRule(metric="stage.ppl", baseline_metric="stage.start.ppl", higher_is_better=False,
                        max_regression_pct=-20.0)],
    )  # fmt: skip
    assert evaluate_gate("lora", gate, {"stage.ppl": 70.0, "stage.start.ppl": 100.0}, None).passed
    v = evaluate_gate("lora", gate, {"stage.ppl": 90.0, "stage.start.ppl": 100.0}, {"stage.ppl": 1.0})
    assert not v.passed and "-10.00% vs stage.start.ppl 100" in v.results[0].reason
    v = evaluate_gate("lora", gate, {"stage.ppl": 90.0}, None)
    assert not v.passed and "no stage.start.ppl value (metric missing" in v.results[0].reason
    # check_gate does not look for the baseline stage's results when every rule compares within
    from llm_pipeline.gates import check_gate

    cfg = tmp_path / "gates.yaml"
    cfg.write_text(json.dumps({"stages": {"lora": gate.model_dump(exclude_none=True)}}))
    res = tmp_path / "evals" / "lora_final" / "results.json"
    res.parent.mkdir(parents=True)
    res.write_text(json.dumps({"metrics": {"stage": {"ppl": 60.0, "start": {"ppl": 100.0}}}}))
    assert check_gate("lora", res, config=cfg).passed


def test_pipeline_routes_the_stage_first_and_last_held_out_evaluations(tmp_path):
    from llm_pipeline.pipeline import _last_eval_metrics

    rows = [
        {"step": 0, "split": "eval", "time": 1.0, "loss": 5.0, "ppl": 148.4, "general_ppl": 20.0},
        {"step": 5, "split": "train", "time": 2.0, "loss": 4.0},
        {"step": 10, "split": "eval", "time": 3.0, "loss": 4.0, "ppl": 54.6, "general_ppl": 21.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _last_eval_metrics(tmp_path) == {
        "loss": 4.0, "ppl": 54.6, "general_ppl": 21.0, "start": {"loss": 5.0, "ppl": 148.4, "general_ppl": 20.0},
    }  # fmt: skip


def test_a_missing_baseline_blocks_the_gate_and_says_where_it_looked(tmp_path):
    """The baseline stage was never evaluated: the regression rules fail (exit 3, as any blocked gate), each
    naming the folder it looked in; the absolute rules are still checked."""
    cfg = tmp_path / "gates.yaml"
    cfg.write_text("stages:\n  dpo:\n    baseline_stage: sft\n    rules:\n"
                   "      - {metric: ppl, higher_is_better: false, max_regression_pct: 10}\n"
                   "      - {metric: ppl, max: 100}\n")  # fmt: skip
    (tmp_path / "evals" / "dpo_final").mkdir(parents=True)
    (tmp_path / "evals" / "dpo_final" / "results.json").write_text(json.dumps({"metrics": {"ppl": 42.0}}))
    args = ["gates", "dpo", "--evals-dir", str(tmp_path / "evals"), "--config", str(cfg)]
    assert main(args) == 3
    from llm_pipeline.gates import check_gate

    verdict = check_gate("dpo", tmp_path / "evals" / "dpo_final", config=cfg)
    regression, bound = verdict.results
    assert not regression.passed and bound.passed
    where = tmp_path / "evals" / "sft_final"
    assert f"no sft_final (baseline stage sft has no results.json in {where}) value" in regression.reason
