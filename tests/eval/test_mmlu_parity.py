"""MMLU: our 5-shot log-likelihood accuracy equals lm-eval 0.4's on the same HF-exported model and data."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from llm_pipeline.checkpoint.hf import load_pretrained
from llm_pipeline.eval.config import MultipleChoiceConfig
from llm_pipeline.eval.multiple_choice import mmlu_prompt, mmlu_questions, score_questions

SUBJECTS = ["college_biology", "world_history"]
# lm-eval's own MMLU template (tasks/mmlu/default/_default_template_yaml), YAML-escaped.
DOC_TO_TEXT = (
    "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
)


def _write_mmlu(root: Path, words: list[str], n_test: int = 6, seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """Original-layout CSVs under root/{dev,test}/ and the same rows as cais/mmlu-style JSONL for lm-eval."""
    rng = random.Random(seed)
    data: dict[str, dict[str, list[dict]]] = {}
    for subject in SUBJECTS:
        data[subject] = {}
        for split, n in (("dev", 5), ("test", n_test)):
            rows = []
            for _ in range(n):
                q = " ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + "?"
                choices = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(4)]
                rows.append({"question": q, "choices": choices, "answer": rng.randrange(4), "subject": subject})
            data[subject][split] = rows
            (root / split).mkdir(parents=True, exist_ok=True)
            with (root / split / f"{subject}_{split}.csv").open("w", newline="") as f:
                w = csv.writer(f)
                for r in rows:
                    w.writerow([r["question"], *r["choices"], "ABCD"[r["answer"]]])
            with (root / f"{subject}_{split}.jsonl").open("w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    return data


def _lm_eval_yaml(root: Path, subject: str) -> None:
    desc = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\\n\\n"
    (root / f"tiny_mmlu_{subject}.yaml").write_text(
        f"""task: tiny_mmlu_{subject}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / f"{subject}_test.jsonl"}
    dev: {root / f"{subject}_dev.jsonl"}
  cache_dir: {root / "hf_cache"}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{DOC_TO_TEXT}"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
description: "{desc}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )


def test_prompt_layout_is_the_documented_one() -> None:
    shot = {"question": "  What is 1+1? ", "choices": ["1", "2", "3", "4"], "answer": 1}
    q = {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo", "Bern"], "answer": 1}
    assert mmlu_prompt("high_school_geography", [shot, shot], q) == (
        "The following are multiple choice questions (with answers) about high school geography.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Capital of France?\nA. Rome\nB. Paris\nC. Oslo\nD. Bern\nAnswer:"
    )


def test_accuracy_matches_lm_eval(
    tmp_path: Path, model_dir: Path, tokenizer, words: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = _write_mmlu(tmp_path, words)
    for subject in SUBJECTS:
        _lm_eval_yaml(tmp_path, subject)

    model = load_pretrained(model_dir)
    questions = mmlu_questions(MultipleChoiceConfig(source=str(tmp_path)), limit=None)
    ours, samples = score_questions(model, tokenizer, questions, batch_size=4)

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=[f"tiny_mmlu_{s}" for s in SUBJECTS],
        num_fewshot=5,
        batch_size=4,
        device="cpu",
        log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
    theirs_acc = {s: out["results"][f"tiny_mmlu_{s}"]["acc,none"] for s in SUBJECTS}
    for s in SUBJECTS:
        assert ours["per_group"][s]["accuracy"] == pytest.approx(theirs_acc[s], abs=1e-9), s
    n_total = sum(len(data[s]["test"]) for s in SUBJECTS)
    micro = sum(theirs_acc[s] * len(data[s]["test"]) for s in SUBJECTS) / n_total
    assert ours["accuracy"] == pytest.approx(micro)
    assert ours["accuracy_macro"] == pytest.approx(sum(theirs_acc.values()) / len(SUBJECTS))

    # Same prompts and (to float tolerance) the same log-likelihoods, question by question.
    by_id = {s["id"]: s for s in samples}
    checked = 0
    for s in SUBJECTS:
        for rec in out["samples"][f"tiny_mmlu_{s}"]:
            mine = by_id[f"{s}/{rec['doc_id']}"]
            args = rec["arguments"]
            ctx = args[0][0] if isinstance(args, list) else args["gen_args_0"]["arg_0"]
            q = next(x for x in questions if x.uid == mine["id"])
            assert ctx == q.query
            their_lls = [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in rec["resps"]]
            assert mine["loglikelihoods"] == pytest.approx(their_lls, abs=1e-3)
            checked += 1
    assert checked == n_total
