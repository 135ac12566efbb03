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
