"""End-to-end: run_evals on a tiny HF model directory, budgets, error isolation and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from llm_pipeline.cli import main
from llm_pipeline.config import load_config
from llm_pipeline.eval.config import EvalConfig
from llm_pipeline.eval.runner import run_evals


def _mmlu_dir(root: Path, words: list[str]) -> Path:
    for split, n in (("dev", 5), ("test", 3)):
        (root / split).mkdir(parents=True)
        with (root / split / f"anatomy_{split}.csv").open("w", newline="") as f:
            for i in range(n):
                csv.writer(f).writerow([f"{words[i]} {words[i + 1]}?", *words[i : i + 4], "ABCD"[i % 4]])
    return root


@pytest.fixture
def eval_cfg(tmp_path: Path, words: list[str]) -> EvalConfig:
    text = tmp_path / "heldout.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(words[i:] + words[:i])}) + "\n" for i in range(3)))
    return EvalConfig.model_validate(
        {
            "tasks": ["perplexity", "mmlu", "humaneval", "safety"],
            "limit": 2,
            "perplexity": {"files": [str(text)], "seq_len": 64},
            "mmlu": {"source": str(_mmlu_dir(tmp_path / "mmlu", words))},
            "humaneval": {"max_new_tokens": 8, "workers": 2, "k": [1]},
            "safety": {"max_new_tokens": 8},
        }
    )


def test_all_evals_write_results_and_samples(tmp_path: Path, model_dir: Path, eval_cfg: EvalConfig) -> None:
    out = tmp_path / "evals" / "debug"
    res = run_evals(model_dir, eval_cfg, output=out)
    assert {t: e.status for t, e in res.tasks.items()} == dict.fromkeys(eval_cfg.tasks, "ok")
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["metrics"]["mmlu"]["status"] == "ok"
    assert 0.0 <= on_disk["metrics"]["mmlu"]["accuracy"] <= 1.0
    assert on_disk["metrics"]["perplexity"]["bits_per_byte"] > 0
    assert on_disk["metrics"]["humaneval"]["pass@1"] == 0.0  # a random model writes no working code
    assert 0.0 <= on_disk["metrics"]["safety"]["refusal_rate"] <= 1.0
    for task in eval_cfg.tasks:
        lines = (out / "samples" / f"{task}.jsonl").read_text().splitlines()
        assert lines and all(json.loads(x) for x in lines)
    assert len((out / "samples" / "humaneval.jsonl").read_text().splitlines()) == 2  # --limit 2 problems
    assert len((out / "samples" / "mmlu.jsonl").read_text().splitlines()) == 2  # limit per subject
    # The resolved config saved beside the results loads back through the same schema.
    assert load_config(EvalConfig, out / "eval_config.yaml") == eval_cfg


def test_timed_out_eval_is_not_a_zero_and_others_run(tmp_path: Path, model_dir: Path, eval_cfg: EvalConfig) -> None:
    cfg = eval_cfg.model_copy(update={"tasks": ["perplexity", "mmlu"]})
    cfg.perplexity.timeout_s = 1e-9
    res = run_evals(model_dir, cfg, output=tmp_path / "out")
    ppl = res.tasks["perplexity"]
    assert ppl.status == "timed_out" and ppl.metrics is None and "timed out" in (ppl.error or "")
    assert res.metrics["perplexity"] == {"status": "timed_out"}
    assert res.tasks["mmlu"].status == "ok"


def test_broken_eval_is_reported_and_others_run(tmp_path: Path, model_dir: Path, eval_cfg: EvalConfig) -> None:
    cfg = eval_cfg.model_copy(update={"tasks": ["mmlu", "perplexity"]})
    cfg.mmlu.source = str(tmp_path / "no-such-dir")
    res = run_evals(model_dir, cfg)
    assert res.tasks["mmlu"].status == "error" and "no-such-dir" in (res.tasks["mmlu"].error or "")
    assert res.tasks["perplexity"].status == "ok"


def test_cli_scores_samples_without_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_pipeline.eval.humaneval import load_problems

    problems = list(load_problems().values())[:3]
    samples = tmp_path / "samples.jsonl"
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    rows.append({"task_id": problems[0]["task_id"], "completion": "    return None\n"})
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "humaneval", "--samples", str(samples), "--set", "humaneval.k=[1,2]"]) == 0
    res = json.loads((tmp_path / "evals" / "samples-samples" / "results.json").read_text())
    m = res["metrics"]["humaneval"]
    assert m["pass@1"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert "pass@2" not in m  # only one sample for two of the tasks
    assert yaml.safe_load((tmp_path / "evals" / "samples-samples" / "eval_config.yaml").read_text())["tasks"] == [
        "humaneval"
    ]


def test_cli_errors_are_actionable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path / "missing")]) == 1
    assert "not a model directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", "mmlu", "--set", "mmlu.bach_size=3"]) == 2
    assert "bach_size" in capsys.readouterr().err


def test_run_evals_takes_a_yaml_path_or_mapping(tmp_path: Path, model_dir: Path) -> None:
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text("tasks: [mmlu]\nlimit: 2\nmmlu: {source: 'builtin:python'}\n")
    res = run_evals(model_dir, cfg_file)
    assert res.metrics["mmlu"]["status"] == "ok" and res.metrics["mmlu"]["n"] == 2
    res = run_evals(model_dir, {"tasks": ["mmlu"], "limit": 1, "mmlu": {"source": "builtin:python"}})
    assert res.metrics["mmlu"]["n"] == 1


def test_a_tasks_own_limit_overrides_the_suites(tmp_path: Path, model_dir: Path) -> None:
    cfg = {"tasks": ["mmlu"], "limit": 1, "mmlu": {"source": "builtin:python", "limit": 3}}
    assert run_evals(model_dir, cfg, output=tmp_path / "out").metrics["mmlu"]["n"] == 3
