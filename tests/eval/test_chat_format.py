"""chat_format: held-out stdlib questions through the chat template; format compliance and overlap."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_pipeline.eval.chat_format import held_out_questions, word_f1
from llm_pipeline.eval.runner import run_evals


@pytest.mark.slow  # parses the standard library (seconds)
def test_word_f1_and_questions_come_from_held_out_modules() -> None:
    assert word_f1("Return the JSON string.", "return the json string") == 1.0
    assert word_f1("", "x") == 0.0 and 0 < word_f1("return a string", "return the json string") < 1
    qa = held_out_questions(["json"], 5)
    assert len(qa) == 5 and all(q.startswith("What does `json.") for q, _ in qa)
    assert qa == held_out_questions(["json"], 5)  # deterministic


@pytest.mark.slow
def test_chat_format_runs_on_a_model_and_counts_turn_endings(model_dir: Path, tmp_path: Path) -> None:
    cfg = {"tasks": ["chat_format"], "device": "cpu", "limit": 3,
           "chat_format": {"held_out_modules": ["json"], "max_new_tokens": 4}}  # fmt: skip
    res = run_evals(model_dir, cfg, output=tmp_path)
    entry = res.tasks["chat_format"]
    assert entry.status == "ok", entry.error
    m = res.metrics["chat_format"]
    assert m["n"] == 3 and 0.0 <= m["format_rate"] <= 1.0 and 0.0 <= m["answer_f1"] <= 1.0


def test_a_pipeline_asks_chat_format_only_about_modules_its_data_held_out(tmp_path: Path, caplog) -> None:
    """The SFT data holds out fewer modules than the default (it trains on textwrap and statistics): the
    pipeline's chat_format then asks about the modules every stdlib source held out, never textwrap."""
    from llm_pipeline.config import load_config
    from llm_pipeline.data.config import DataConfig
    from llm_pipeline.eval.config import EvalConfig
    from llm_pipeline.pipeline import PipelineConfig, _Run
    from llm_pipeline.train.stage import stage_class

    root = Path(__file__).resolve().parents[2]
    run = _Run(PipelineConfig(run_dir=tmp_path / "run"), start=None, only=None)
    run.hold_out(load_config(DataConfig, root / "configs" / "demo" / "data.yaml"))  # the five default modules
    sft = stage_class("sft").config_class
    run.hold_out(load_config(sft, root / "configs" / "demo" / "sft.yaml", ["data.held_out_modules=[json,csv,wave]"]))
    evals = EvalConfig.model_validate({"tasks": ["chat_format"]})
    assert run.chat_format_modules(evals) == {"chat_format.held_out_modules": ["csv", "json", "wave"]}
    named = EvalConfig.model_validate({"tasks": ["chat_format"], "chat_format": {"held_out_modules": ["textwrap"]}})
    with caplog.at_level("WARNING"):
        assert run.chat_format_modules(named) == {}  # the config's own choice stands, with a warning
    assert "textwrap, which this run's data trains on" in caplog.text
