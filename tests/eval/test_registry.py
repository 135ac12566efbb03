"""The evaluation task registry, typed results and what ``llm-pipeline eval`` says on its way.

A task written outside the package (``next_token_task.py``) is added with one call and then runs through
``llm-pipeline eval``, lands in ``results.json`` and is gated, with no change anywhere else.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from llm_pipeline.cli import main
from llm_pipeline.config import ConfigError, load_config
from llm_pipeline.eval import runner
from llm_pipeline.eval.config import EvalConfig
from llm_pipeline.eval.results import EvalResults
from llm_pipeline.eval.task import EVAL_TASKS, EvalTask, headline_metrics, register_task, task_class, task_names
from llm_pipeline.gates import check_gate, load_results


@pytest.fixture
def next_token(tmp_path: Path, words: list[str]) -> Iterator[Path]:
    """The test task registered as ``next_token`` (removed again afterwards); yields its text file."""
    register_task("next_token", "next_token_task:NextTokenTask")
    text = tmp_path / "lines.txt"
    text.write_text("".join(" ".join(words[i : i + 8]) + "\n" for i in range(0, 24, 4)))
    yield text
    EVAL_TASKS.pop("next_token")


def test_a_task_added_in_one_module_runs_through_eval_results_and_gates(
    tmp_path: Path, model_dir: Path, next_token: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "eval.yaml"
    settings = {"tasks": ["next_token", "mmlu"], "limit": 3, "device": "cpu", "next_token": {"file": str(next_token)}}
    cfg.write_text(yaml.safe_dump({**settings, "mmlu": {"source": "builtin:python"}}))
    out = tmp_path / "evals" / "sft_final"
    assert main(["eval", str(model_dir), "--config", str(cfg), "--output", str(out), "--timeout", "120"]) == 0
    err = capsys.readouterr().err
    assert "eval: next_token: ok in" in err  # its progress line, with the headline metric

    results = EvalResults.load(out)
    assert results.model == str(model_dir) and results.model_load_s is not None and results.wall_s is not None
    entry = results.tasks["next_token"]
    assert entry.status == "ok" and entry.timeout_s == 120  # --timeout reaches every registered task
    assert entry.metrics is not None and entry.metrics["n"] == 3  # the suite's limit
    assert 0.0 <= results.metrics["next_token"]["accuracy"] <= 1.0
    assert len((out / "samples" / "next_token.jsonl").read_text().splitlines()) == 3
    assert load_results(out)["next_token.accuracy"] == results.metrics["next_token"]["accuracy"]
    assert "next_token.accuracy" in headline_metrics()  # the report's columns come from the registry
    saved = yaml.safe_load((out / "eval_config.yaml").read_text())
    assert saved["next_token"] == {"file": str(next_token), "timeout_s": 120.0, "limit": None}

    gates = tmp_path / "gates.yaml"
    for bound, passed in ((0.0, True), (1.01, False)):
        gates.write_text(
            yaml.safe_dump({"stages": {"sft": {"rules": [{"metric": "next_token.accuracy", "min": bound}]}}})
        )
        assert check_gate("sft", out, config=gates).passed is passed


def test_task_sections_and_names_are_checked_against_the_registry(next_token: Path) -> None:
    cfg = load_config(EvalConfig, None, ["next_token.file=x.txt"], tasks=["next_token"])
    assert type(cfg.section("next_token")).__name__ == "NextTokenConfig" and cfg.next_token.file == "x.txt"
    with pytest.raises(ConfigError, match=r"next_token\.fil: unknown key 'fil' \(did you mean 'file'\?\); "
                       r"allowed keys here: file, limit, timeout_s"):  # fmt: skip
        load_config(EvalConfig, None, ["next_token.fil=x"])
    known = ", ".join(task_names())  # every registered task, in registry order, the test's own last
    assert known.startswith("perplexity, mmlu, arc, hellaswag, humaneval, safety, ") and known.endswith("next_token")
    with pytest.raises(ConfigError, match=rf"unknown eval task 'next_tokn' \(did you mean 'next_token'\?\); known "
                       rf"tasks: {known}"):  # fmt: skip
        load_config(EvalConfig, None, tasks=["next_tokn"])
    with pytest.raises(ConfigError, match=r"nxt_token: unknown key 'nxt_token' \(did you mean 'next_token'\?\)"):
        load_config(EvalConfig, None, ["nxt_token.file=x"])


def test_assignments_are_validated_and_leave_the_other_sections_typed() -> None:
    from llm_pipeline.eval.multiple_choice import MultipleChoiceConfig

    cfg = EvalConfig()
    cfg.tasks = ["mmlu"]
    cfg.mmlu = {"source": "builtin:python"}
    assert isinstance(cfg.mmlu, MultipleChoiceConfig) and cfg.mmlu.source == "builtin:python"
    assert all(isinstance(cfg.section(name), task_class(name).config_class) for name in EVAL_TASKS)
    with pytest.raises(ValueError, match="instance of PerplexityConfig"):
        cfg.perplexity = cfg.mmlu
    with pytest.raises(ValueError, match=r"mmlu\.bach_size"):
        cfg.mmlu = {"bach_size": 3}
    assert EvalConfig.model_validate(cfg.model_dump()) == cfg


def test_every_shipped_task_is_registered_with_its_section_and_headline() -> None:
    cfg = EvalConfig()
    for name in EVAL_TASKS:
        cls = task_class(name)
        assert isinstance(cfg.section(name), cls.config_class)
        assert cls.headline or cls.shown is not EvalTask.shown  # fixed headline metrics, or ones it picks per result
    # The run report's columns, as they were before the registry (order included).
    assert headline_metrics() == [
        "perplexity.perplexity", "perplexity.bits_per_byte", "mmlu.accuracy", "arc.accuracy_norm",
        "hellaswag.accuracy_norm", "humaneval.pass@1", "safety.refusal_rate", "safety.over_refusal_rate",
        "safety_heldout.refusal_rate", "safety_heldout.over_refusal_rate", "arithmetic_accuracy.accuracy",
        "chat_format.format_rate", "chat_format.answer_f1", "domain_perplexity.perplexity",
        "domain_perplexity.bits_per_byte",
    ]  # fmt: skip


def test_unregistered_section_in_an_old_config_is_refused_with_the_known_tasks() -> None:
    known = "arc, arithmetic_accuracy, chat_format, device"
    with pytest.raises(ConfigError, match=f"unknown key 'gsm8k'; allowed keys here: {known}"):
        load_config(EvalConfig, None, ["gsm8k.limit=3"])


# ---- typed results -------------------------------------------------------------------------------


def test_results_files_of_every_layout_load_and_gates_read_the_same_paths(tmp_path: Path) -> None:
    layouts = {
        "current": {"model": "m", "metrics": {"mmlu": {"status": "ok", "accuracy": 0.5}, "stage": {"loss": 1.5}},
                    "tasks": {"mmlu": {"status": "ok", "metrics": {"accuracy": 0.5}, "wall_s": 1.0}},
                    "host": {"python": "3.12", "torch": "2", "device": "cpu", "gpu": "none"}, "future_key": [1]},
        "metrics only": {"metrics": {"perplexity": {"status": "ok", "perplexity": 12.0}, "ppl": 42.0}},
        "bare metrics": {"mmlu": {"accuracy": 0.5}, "stage": {"loss": 1.5}},
    }  # fmt: skip
    for name, data in layouts.items():
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps(data))
        flat = load_results(path.parent)
        assert flat, name
        res = EvalResults.load(path)
        res.save(tmp_path / name / "again.json")  # written back through the same class: nothing lost
        again = json.loads((tmp_path / name / "again.json").read_text())
        assert load_results(tmp_path / name / "again.json") == flat, name
        if "metrics" in data:
            assert again["metrics"] == data["metrics"]
    assert load_results(tmp_path / "current")["stage.loss"] == 1.5
    assert load_results(tmp_path / "bare metrics")["mmlu.accuracy"] == 0.5
    assert json.loads((tmp_path / "current" / "again.json").read_text())["future_key"] == [1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected the JSON object"),
        ('{"metrics": [1]}', "not an evaluation results file (metrics: Input should be a valid dictionary"),
        ('{"tasks": {"mmlu": {"status": "great"}}}', "not an evaluation results file (tasks.mmlu.status"),
    ],
)
def test_broken_results_files_are_named_in_the_error(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ValueError, match=str(tmp_path / "results.json")) as e:
        load_results(tmp_path)
    assert message in str(e.value)


# ---- what a newcomer sees ------------------------------------------------------------------------


def test_a_model_path_outside_its_run_folder_is_answered_with_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``11_evaluate.py checkpoints/dpo_final`` after ``make demo``: the model is in runs/demo/checkpoints."""
    run = tmp_path / "runs" / "demo"
    for stage in ("sft", "dpo"):
        (run / "checkpoints" / f"{stage}_final").mkdir(parents=True)
        (run / "checkpoints" / f"{stage}_final" / "config.json").write_text("{}")
    (run / "pipeline.resolved.yaml").write_text("run_dir: runs/demo\n")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "checkpoints/dpo_final"]) == 1
    err = capsys.readouterr().err
    assert "checkpoints/dpo_final: not a model directory; did you mean runs/demo/checkpoints/dpo_final?" in err
    assert main(["eval", "checkpoints/ppo_final"]) == 1  # no such model: the runs' models are listed
    err = capsys.readouterr().err
    assert "models in the run folders here: runs/demo/checkpoints/dpo_final, runs/demo/checkpoints/sft_final" in err


def test_progress_is_logged_per_task_with_timing_when_output_is_not_a_terminal(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.0)  # every progress report becomes a line
    buf = io.StringIO()
    cfg = {"tasks": ["mmlu"], "limit": 2, "mmlu": {"source": "builtin:python", "batch_size": 2}}
    runner.run_evals(model_dir, cfg, console=Console(file=buf, width=200))
    lines = buf.getvalue().splitlines()
    assert any(line.startswith("eval: loading the model from") for line in lines)
    assert any(line.startswith("eval: model loaded in") for line in lines)
    assert "eval: mmlu: started (budget 3600s)" in lines
    assert any(line.startswith("eval: mmlu: ") and "/8 after" in line for line in lines)  # 2 questions x 4 choices
    assert any(line.startswith("eval: mmlu: ok in ") and "(accuracy " in line for line in lines)


def test_a_task_declares_its_command_line_shorthand_in_its_registry_entry(
    tmp_path: Path, model_dir: Path, next_token: Path
) -> None:
    """A flag a task registers selects the task and sets its key; the planner and the CLI name no task."""
    from llm_pipeline.eval.task import EVAL_TASK_FLAGS, TaskFlag

    flag = TaskFlag("--next-token-file", "file", "text to score next-token accuracy on", selects=True)
    register_task("next_token", "next_token_task:NextTokenTask", flags=(flag,))
    try:
        out = tmp_path / "out"
        argv = ["eval", str(model_dir), "--next-token-file", str(next_token), "--limit", "2", "--device", "cpu"]
        assert main([*argv, "--output", str(out)]) == 0
    finally:
        EVAL_TASK_FLAGS.pop("next_token")
    results = EvalResults.load(out)
    assert list(results.tasks) == ["next_token"] and results.tasks["next_token"].status == "ok"
    assert yaml.safe_load((out / "eval_config.yaml").read_text())["next_token"]["file"] == str(next_token)
