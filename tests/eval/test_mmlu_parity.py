"""Multiple choice: our MMLU (5-shot), ARC and HellaSwag scores equal lm-eval 0.4's on the same model and data.

lm-eval runs once (module fixture) with its `hf` model on our HF export and custom task YAMLs that copy
its own templates, over local data files the test writes."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from llm_pipeline.checkpoint.hf import load_pretrained
from llm_pipeline.eval.multiple_choice import (
    MultipleChoiceConfig,
    arc_questions,
    hellaswag_questions,
    mmlu_prompt,
    mmlu_questions,
    score_questions,
)

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
num_fewshot: 5
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


ARC_YAML = """task: tiny_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: multiple_choice
test_split: test
num_fewshot: 0
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

HELLASWAG_YAML = """task: tiny_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
  cache_dir: {cache}
output_type: multiple_choice
validation_split: validation
num_fewshot: 0
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _phrase(rng: random.Random, words: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def _write_arc_hellaswag(root: Path, words: list[str], n: int = 8, seed: int = 1) -> None:
    rng = random.Random(seed)
    with (root / "arc.jsonl").open("w") as f:
        for i in range(n):
            k = rng.choice([3, 4, 5])
            labels = list("ABCDE"[:k]) if i % 2 else [str(j + 1) for j in range(k)]
            row = {
                "id": f"arc-{i}",
                "question": _phrase(rng, words, 4, 10) + "?",
                "choices": {"text": [_phrase(rng, words, 1, 6) for _ in range(k)], "label": labels},
                "answerKey": rng.choice(labels),
            }
            f.write(json.dumps(row) + "\n")
    with (root / "hellaswag.jsonl").open("w") as f:
        for i in range(n):
            row = {
                "ind": i,
                "activity_label": _phrase(rng, words, 1, 2).title(),
                "ctx_a": _phrase(rng, words, 5, 12) + (" [title] " + _phrase(rng, words, 2, 4) if i % 3 == 0 else ""),
                "ctx_b": _phrase(rng, words, 1, 4),
                "endings": [_phrase(rng, words, 2, 10) + (" [step]" if j == i % 4 else "") for j in range(4)],
                "label": str(rng.randrange(4)),
            }
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, words: list[str]) -> dict:
    """Write the data and task YAMLs, run lm-eval once over all of them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    import lm_eval.tasks.hellaswag.utils as hellaswag_utils
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("harness")
    data = _write_mmlu(root, words)
    for subject in SUBJECTS:
        _lm_eval_yaml(root, subject)
    _write_arc_hellaswag(root, words)
    cache = root / "hf_cache"
    (root / "tiny_arc.yaml").write_text(ARC_YAML.format(data=root / "arc.jsonl", cache=cache))
    (root / "tiny_hellaswag.yaml").write_text(HELLASWAG_YAML.format(data=root / "hellaswag.jsonl", cache=cache))
    shutil.copy(hellaswag_utils.__file__, root / "utils.py")  # lm-eval's own HellaSwag preprocessing
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=[*(f"tiny_mmlu_{s}" for s in SUBJECTS), "tiny_arc", "tiny_hellaswag"],
        batch_size=4,
        device="cpu",
        log_samples=True,
        task_manager=TaskManager(include_path=str(root)),
    )
    return {"root": root, "data": data, "out": out, "model": load_pretrained(model_dir)}


def _their_lls(rec: dict) -> list[float]:
    return [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in rec["resps"]]


def _their_context(rec: dict) -> str:
    args = rec["arguments"]
    return args[0][0] if isinstance(args, list) else args["gen_args_0"]["arg_0"]


def test_mmlu_accuracy_matches_lm_eval(harness: dict, tokenizer) -> None:
    out, data = harness["out"], harness["data"]
    questions = mmlu_questions(MultipleChoiceConfig(source=str(harness["root"])), limit=None)
    ours, samples = score_questions(harness["model"], tokenizer, questions, batch_size=4)

    theirs_acc = {s: out["results"][f"tiny_mmlu_{s}"]["acc,none"] for s in SUBJECTS}
    for s in SUBJECTS:
        assert ours["per_group"][s]["accuracy"] == pytest.approx(theirs_acc[s], abs=1e-9), s
    n_total = sum(len(data[s]["test"]) for s in SUBJECTS)
    micro = sum(theirs_acc[s] * len(data[s]["test"]) for s in SUBJECTS) / n_total
    assert ours["accuracy"] == pytest.approx(micro)
    assert ours["accuracy_macro"] == pytest.approx(sum(theirs_acc.values()) / len(SUBJECTS))

    # Same prompts and (to float tolerance) the same log-likelihoods, question by question.
    by_id = {s["id"]: s for s in samples}
    queries = {q.uid: q.query for q in questions}
    checked = 0
    for s in SUBJECTS:
        for rec in out["samples"][f"tiny_mmlu_{s}"]:
            uid = f"{s}/{rec['doc_id']}"
            assert _their_context(rec) == queries[uid]
            assert by_id[uid]["loglikelihoods"] == pytest.approx(_their_lls(rec), abs=1e-3)
            checked += 1
    assert checked == n_total


@pytest.mark.parametrize("task", ["arc", "hellaswag"])
def test_arc_and_hellaswag_match_lm_eval(harness: dict, tokenizer, task: str) -> None:
    root = harness["root"]
    build = arc_questions if task == "arc" else hellaswag_questions
    questions = build(MultipleChoiceConfig(source=str(root / f"{task}.jsonl")), None)
    ours, samples = score_questions(harness["model"], tokenizer, questions, batch_size=3)
    theirs = harness["out"]["results"][f"tiny_{task}"]
    assert ours["accuracy"] == pytest.approx(theirs["acc,none"], abs=1e-9)
    assert ours["accuracy_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-9)
    recs = harness["out"]["samples"][f"tiny_{task}"]
    assert len(recs) == len(samples)
    for rec in recs:
        q, mine = questions[rec["doc_id"]], samples[rec["doc_id"]]
        assert _their_context(rec) == q.query
        assert mine["loglikelihoods"] == pytest.approx(_their_lls(rec), abs=1e-3)
