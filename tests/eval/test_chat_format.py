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
