"""Bad input gets a clear error or a reject with its reason, never a traceback, a silent default, or a
score that claims more than it measured."""

from __future__ import annotations

import json

import pytest

from llm_pipeline.cli import main
from llm_pipeline.config import ConfigError, load_yaml
from llm_pipeline.gates import GateRule, StageGate, evaluate_gate, flatten_metrics

from .conftest import make_run


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


# ---- data: one bad record never stops a download, nor breaks cleaning ----------------------


def test_lone_surrogates_and_non_finite_numbers_are_rejects_with_file_and_line(tmp_path):
    from llm_pipeline.data.clean import clean
    from llm_pipeline.data.config import DataConfig
    from llm_pipeline.data.sources import download

    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"id": "1", "text": "a perfectly fine first document"}\n'
        '{"id": "2", "text": "a \\ud800 b"}\n'  # valid JSON, but no UTF-8 can hold a lone surrogate
        '{"id": "3", "text": "fine text", "score": NaN}\n'
        '{"id": "4", "text": "fine text", "meta": {"w": [1, -Infinity]}}\n'
        '{"id": "\\udfff", "text": "a surrogate in the id"}\n'
        '{"id": "6", "text": "another perfectly fine document"}\n',
        encoding="utf-8",
    )
    cfg = DataConfig.model_validate(
        {
            "output_dir": str(tmp_path / "out"),
            "source": {"kind": "local", "paths": [str(src)]},
            "clean": {"filters": "none", "executor": {"tasks": 1, "workers": 1}},
        }
    )
    manifest = download(cfg, show_progress=False)
    assert manifest["documents"] == 2
    assert manifest["rejected"] == {"invalid_unicode": 2, "non_finite_number": 2}
    rejects = [json.loads(line) for line in (cfg.raw_dir / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["reason"]) for r in rejects] == [
        (str(src), 2, "invalid_unicode"),
        (str(src), 3, "non_finite_number"),
        (str(src), 4, "non_finite_number"),
        (str(src), 5, "invalid_unicode"),
    ]
    assert "'score'" in rejects[1]["detail"] and "meta.w[1]" in rejects[2]["detail"]
    assert clean(cfg, show_progress=False)["documents_in"] == 2  # cleaning reads what download wrote


# ---- HumanEval: coverage, partial results, empty samples ---------------------------------------


def _samples(tmp_path, n: int):
    from llm_pipeline.eval.humaneval import load_problems

    problems = list(load_problems().values())[:n]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n"
                            for p in problems))  # fmt: skip
    return path


def test_partial_humaneval_is_reported_as_partial_and_never_promotes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "humaneval", "--samples", str(_samples(tmp_path, 1))]) == 0
    results = json.loads((tmp_path / "evals" / "samples-samples" / "results.json").read_text())
    m = results["metrics"]["humaneval"]
    assert m["status"] == "partial" and m["pass@1"] == 1.0
    assert (m["problems_scored"], m["problems_expected"]) == (1, 164) and m["coverage"] == pytest.approx(1 / 164)
    assert results["tasks"]["humaneval"]["status"] == "partial"

    flat = flatten_metrics(results["metrics"])
    strict = StageGate(rules=[GateRule(metric="humaneval.pass@1", min=0.5)])
    verdict = evaluate_gate("sft", strict, flat)
    assert not verdict.passed and "partial" in verdict.results[0].reason
    lenient = StageGate(rules=[GateRule(metric="humaneval.pass@1", min=0.5, allow_partial=True)])
    assert evaluate_gate("sft", lenient, flat).passed


def test_full_coverage_is_ok(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "humaneval", "--samples", str(_samples(tmp_path, 3)), "--limit", "3"]) == 0
    m = json.loads((tmp_path / "evals" / "samples-samples" / "results.json").read_text())["metrics"]["humaneval"]
    assert m["status"] == "ok" and m["coverage"] == 1.0


def test_empty_samples_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["eval", "humaneval", "--samples", str(tmp_path / "empty.jsonl")]) == 1
    res = json.loads((tmp_path / "evals" / "samples-empty" / "results.json").read_text())
    assert res["tasks"]["humaneval"]["status"] == "error" and "empty" in res["tasks"]["humaneval"]["error"]
    assert res["metrics"]["humaneval"] == {"status": "error"}


# ---- the smaller ones ------------------------------------------------------------------------------


def test_empty_config_file_is_an_error(tmp_path, capsys):
    empty = tmp_path / "pretrain.yaml"
    empty.write_text("# nothing here yet\n")
    with pytest.raises(ConfigError, match="empty"):
        load_yaml(empty)
    assert main(["pretrain", "--config", str(empty)]) == 2
    assert len(_errors(capsys)) == 1


def test_data_path_at_a_raw_folder_says_what_to_point_at(tmp_path, packed, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "manifest.json").write_text(json.dumps({"step": "download", "documents": 3, "shards": []}))
    run = make_run(tmp_path, packed)
    assert main(["pretrain", "--config", str(run.config), "--set", f"data.path={raw}"]) == 1
    (line,) = _errors(capsys)
    assert "does not hold packed token shards" in line and "download" in line and "packed/" in line


def test_generate_with_out_of_vocabulary_ids(tmp_path, capsys):
    assert main(["init", "--preset", "debug", "-o", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "m"), "--ids", "1 2 99999", "--max-new-tokens", "2"]) == 1
    (line,) = _errors(capsys)
    assert "99999" in line and "vocabulary" in line
    assert main(["generate", str(tmp_path / "m"), "--ids", "1 two"]) == 1
    assert "whole numbers" in _errors(capsys)[0]


@pytest.fixture
def model_with_tokenizer(tmp_path, packed):
    _, tok = packed
    assert main(["init", "--preset", "debug", "-o", str(tmp_path / "m"), "--tokenizer", str(tok)]) == 0
    return tmp_path / "m"


@pytest.mark.parametrize("source", ["./no-such-mmlu", "data/mmlu", "/nonexistent/mmlu", "mmlu/test.csv"])
def test_missing_local_mmlu_is_never_looked_up_on_the_hub(tmp_path, model_with_tokenizer, monkeypatch, source):
    import datasets

    def hub(*a, **k):
        raise AssertionError("looked up on the HF hub")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir(exist_ok=True)
    out = tmp_path / "ev"
    assert main(["eval", str(model_with_tokenizer), "--tasks", "mmlu", "--mmlu", source, "--output", str(out)]) == 1
    task = json.loads((out / "results.json").read_text())["tasks"]["mmlu"]
    assert task["status"] == "error" and "no such local" in task["error"] and "hub" in task["error"]


def test_empty_perplexity_text_is_an_error_not_nan(tmp_path, model_with_tokenizer):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "ev"
    argv = ["eval", str(model_with_tokenizer), "--tasks", "perplexity", "--text", str(tmp_path / "empty.txt")]
    assert main([*argv, "--output", str(out)]) == 1
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"]["perplexity"]["status"] == "error" and "no text to score" in res["tasks"]["perplexity"]["error"]
