"""Suites of lm-eval tasks: configs/eval.yaml's named suites, their averages, and a gate on an average.

lm-eval itself is replaced by canned results here (its parity is tests/eval/test_lm_eval_harness.py), so
these run in well under a second: what is tested is the suite's bookkeeping and the gate that reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_pipeline.config import load_config
from llm_pipeline.eval import harness
from llm_pipeline.eval.budget import Budget
from llm_pipeline.eval.config import EvalConfig
from llm_pipeline.eval.results import EvalResults, TaskResult
from llm_pipeline.eval.task import TaskContext, make_task
from llm_pipeline.gates import check_gate

ROOT = Path(__file__).resolve().parents[2]
OLMES = ["arc_challenge", "arc_easy", "boolq", "commonsense_qa", "hellaswag", "openbookqa", "piqa", "siqa",
         "winogrande", "mmlu"]  # fmt: skip


def test_the_shipped_suites_name_the_published_task_lists() -> None:
    text = (ROOT / "configs" / "eval.yaml").read_text()
    assert "arXiv 2406.08446" in text and "arXiv 2411.15124" in text  # where the settings come from
    suites = load_config(EvalConfig, ROOT / "configs" / "eval.yaml").section("lm_eval").suites  # type: ignore[attr-defined]
    assert [e.name for e in suites["olmes_base"]] == OLMES
    assert {e.num_fewshot for e in suites["olmes_base"]} == {5}  # OLMES: 5 shots everywhere
    tulu = [e.name for e in suites["tulu_dev"]]
    assert (
        len(tulu) == 11
        and "humaneval" in tulu
        and "humaneval_plus" in tulu
        and "ifeval" in tulu
        and tulu[0] == "gsm8k_cot"
    )
    assert next(e for e in suites["tulu_dev"] if e.name == "humaneval").project == "humaneval"  # in our sandbox
    assert 0 < len(suites["quick"]) < len(OLMES)


def _run(scores: dict[str, float], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The lm_eval eval over a 3-task suite, lm-eval answering with ``scores`` (a missing task: no data)."""

    class FakeManager:  # lm-eval's TaskManager: loading a task reads its data
        def load(self, specs: list[Any]) -> None:
            if specs[0] not in scores:
                raise ConnectionError(f"Couldn't reach 'allenai/{specs[0]}' on the Hub (LocalEntryNotFoundError)")

    def fake_evaluate(lm: Any, spec: Any, manager: Any, limit: Any, cfg: Any, shots: Any) -> dict[str, Any]:
        name = spec
        return {"results": {name: {"alias": name, "acc,none": scores[name], "acc_stderr,none": 0.01}},
                "n-samples": {name: {"original": 100, "effective": 100}}}  # fmt: skip

    monkeypatch.setattr(harness, "_simple_evaluate", fake_evaluate)
    monkeypatch.setattr(harness, "task_manager", lambda *a: FakeManager())
    monkeypatch.setattr(harness.LMEvalTask, "_make_lm", lambda self, ctx: object())
    he_plus = {"project": "humaneval", "alias": "he_plus", "settings": {"problems": "/no/he+.jsonl"}}
    entries = [{"task": "a", "metric": "acc"}, {"task": "b"}, {"task": "c"}, he_plus]
    section = {"tasks": ["mini"], "offline": True, "suites": {"mini": entries}}
    task = make_task("lm_eval", EvalConfig.model_validate({"lm_eval": section}).section("lm_eval"))
    metrics, _ = task.run(TaskContext(model=None, budget=Budget(60), limit=None, seed=0))  # type: ignore[arg-type]
    return {"metrics": metrics, "scalars": task.scalars(metrics)}


def test_a_suite_averages_what_ran_and_reports_the_rest_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _run({"a": 0.5, "b": 0.7}, monkeypatch)
    assert out["scalars"]["mini.average"] == pytest.approx(0.6)  # c is not a 0 in the average
    assert out["scalars"]["mini.n_tasks"] == 2 and "c.acc" not in out["scalars"]
    assert "offline" in out["metrics"]["unavailable"]["c"] and "--include-path" in out["metrics"]["unavailable"]["c"]
    assert out["metrics"]["suites"]["mini"]["unavailable"] == ["c", "he_plus"]
    assert "not found: /no/he+.jsonl" in out["metrics"]["unavailable"]["he_plus"]  # a project task's own check


def _results(path: Path, scalars: dict[str, float]) -> Path:
    res = EvalResults()
    res.record("lm_eval", TaskResult(status="ok", metrics={}), scalars)
    res.save(path / "results.json")
    return path


@pytest.mark.parametrize(("after", "passed"), [({"a": 0.49, "b": 0.69}, True), ({"a": 0.45, "b": 0.66}, False)])
def test_a_gate_on_a_suite_average_blocks_a_fall_beyond_the_allowance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: dict[str, float], passed: bool
) -> None:
    evals = tmp_path / "evals"
    (evals / "sft_final").mkdir(parents=True)
    (evals / "dpo_final").mkdir()
    _results(evals / "sft_final", _run({"a": 0.5, "b": 0.7}, monkeypatch)["scalars"])
    _results(evals / "dpo_final", _run(after, monkeypatch)["scalars"])
    gates = tmp_path / "gates.yaml"  # the configs/promotion_gates.yaml form
    rule = {"metric": "lm_eval.mini.average", "max_regression": 0.02}
    gates.write_text(yaml.safe_dump({"stages": {"dpo": {"baseline_stage": "sft", "rules": [rule]}}}))
    verdict = check_gate("dpo", evals / "dpo_final", config=gates)
    assert verdict.passed is passed  # 0.60 -> 0.59 passes; 0.60 -> 0.555 falls by more than 0.02
    if not passed:
        assert "lm_eval.mini.average" in verdict.failed()[0].metric


def _run_suites(
    suites: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch, tasks: list[str] | None = None
) -> tuple[dict[str, Any], list[tuple[Any, Any]]]:
    """The lm_eval eval over ``suites``; lm-eval answers ``acc`` = shots / 10 (0.5 for the task's default)."""
    calls: list[tuple[Any, Any]] = []

    class FakeManager:
        def load(self, specs: list[Any]) -> None:
            pass

    def fake_evaluate(lm: Any, spec: Any, manager: Any, limit: Any, cfg: Any, shots: Any) -> dict[str, Any]:
        calls.append((spec, shots))
        return {"results": {spec: {"acc,none": 0.5 if shots is None else shots / 10}}}

    monkeypatch.setattr(harness, "_simple_evaluate", fake_evaluate)
    monkeypatch.setattr(harness, "task_manager", lambda *a: FakeManager())
    monkeypatch.setattr(harness.LMEvalTask, "_make_lm", lambda self, ctx: object())
    section = {"tasks": tasks or list(suites), "offline": True, "suites": suites}
    task = make_task("lm_eval", EvalConfig.model_validate({"lm_eval": section}).section("lm_eval"))
    metrics, _ = task.run(TaskContext(model=None, budget=Budget(60), limit=None, seed=0))  # type: ignore[arg-type]
    return task.scalars(metrics), calls


def test_one_task_at_two_few_shot_settings_keeps_both_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """olmes_base's 5-shot hellaswag and quick's 0-shot one: each suite averages its own run."""
    suites = {
        "five": [{"task": "h", "num_fewshot": 5}, {"task": "e", "num_fewshot": 0}],
        "zero": [{"task": "h", "num_fewshot": 0}, {"task": "e", "num_fewshot": 0}],
    }
    scalars, calls = _run_suites(suites, monkeypatch)
    assert scalars["h_5shot.acc"] == pytest.approx(0.5) and scalars["h_0shot.acc"] == pytest.approx(0.0)
    assert scalars["five.average"] == pytest.approx(0.25) and scalars["zero.average"] == pytest.approx(0.0)
    assert sorted(calls) == [("e", 0), ("h", 0), ("h", 5)]  # e (same settings in both suites) runs once
    assert "e.acc" in scalars  # a task at one setting keeps its bare name


def test_an_alias_names_an_lm_eval_entry_and_settings_that_clash_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    suites = {"s": [{"task": "h", "num_fewshot": 2, "alias": "h_two"}, {"task": "h"}]}
    scalars, _ = _run_suites(suites, monkeypatch)
    assert scalars["h_two.acc"] == pytest.approx(0.2) and scalars["h.acc"] == pytest.approx(0.5)
    assert scalars["s.n_tasks"] == 2 and scalars["s.average"] == pytest.approx(0.35)
    clash = {"s": [{"task": "h", "overrides": {"num_fewshot": 1}}, {"task": "h"}]}
    with pytest.raises(ValueError, match="give one of them an alias"):
        _run_suites(clash, monkeypatch)
    two_projects = {"a": [{"project": "humaneval", "settings": {"k": [1]}}],
                    "b": [{"project": "humaneval", "settings": {"k": [10]}}]}  # fmt: skip
    with pytest.raises(ValueError, match="give one of them an alias"):
        _run_suites(two_projects, monkeypatch)


def test_a_project_entry_keeps_the_suites_deadline_and_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """A project task inside the lm_eval eval runs under the eval's deadline, its own counter apart."""
    from llm_pipeline.eval import task as task_module

    seen: list[Budget] = []

    class Inner:
        config_class = EvalConfig

        def unavailable(self) -> None:
            return None

        def run(self, ctx: TaskContext) -> tuple[dict[str, float], list[Any]]:
            seen.append(ctx.budget)
            ctx.budget.set_total(99)
            return {"pass@1": 0.25}, []

        def scalars(self, metrics: dict[str, float]) -> dict[str, float]:
            return metrics

    monkeypatch.setattr(task_module, "task_class", lambda name: Inner)
    monkeypatch.setattr(task_module, "make_task", lambda name, cfg: Inner())
    outer = Budget(60)
    entry = harness.SuiteEntry(project="humaneval")
    task = harness.LMEvalTask("lm_eval", harness.LMEvalConfig())
    outer.set_total(3)
    got, why = task._run_project(entry, TaskContext(model=None, budget=outer, limit=None, seed=0))  # type: ignore[arg-type]
    assert why is None and got == {"pass@1": 0.25}
    assert outer.total == 3  # the lm_eval eval's own count of entries is intact
    assert seen[0] is not outer and seen[0].deadline == outer.deadline


def test_log_likelihood_requests_stop_at_the_deadline() -> None:
    """``lm_eval.timeout_s`` holds inside a log-likelihood task: scoring checks the budget between batches."""
    pytest.importorskip("lm_eval")
    from llm_pipeline.eval.budget import EvalTimeout
    from llm_pipeline.model import build_model, get_preset

    cls = harness._pipeline_lm_class()
    lm = cls.__new__(cls)  # no tokenizer needed to score token ids
    lm.model, lm.batch_size_, lm.max_length, lm.budget = build_model(get_preset("debug")), 2, 64, Budget(0.0)
    with pytest.raises(EvalTimeout):
        lm._loglikelihood_tokens([(None, [1, 2, 3], [4])])
    lm.budget = Budget(60)
    assert len(lm._loglikelihood_tokens([(None, [1, 2, 3], [4])])) == 1  # within the deadline it scores


def test_the_lm_eval_version_is_read_by_one_helper() -> None:
    from llm_pipeline.eval import runner

    assert runner.lm_eval_version is harness.lm_eval_version  # results.json's host and the eval's metrics agree
    assert not hasattr(runner, "_version")
