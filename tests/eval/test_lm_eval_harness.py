"""lm-evaluation-harness tasks through the ``lm_eval`` eval: our model behind lm-eval's ``LM`` interface
gives lm-eval's own numbers (``HFLM`` on the same export) exactly, offline, on local data.

Tasks: a custom YAML multiple-choice task, a rolling-perplexity task and a generative exact-match task,
and two registry tasks (``arc_easy``, ``piqa``) whose YAML ``include``s lm-eval's own file with only the
data pointed at local JSON / Parquet files. lm-eval's reference run happens once per module."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from llm_pipeline.eval.harness import metric_key  # noqa: E402
from llm_pipeline.eval.runner import run_evals  # noqa: E402

TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"
QA_YAML = """task: tiny_qa
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
output_type: multiple_choice
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
ROLLING_YAML = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
output_type: generate_until
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
"""
ARC_YAML = """include: {base}
task: arc_easy_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files: {{train: {train}, test: {test}}}
"""
GSM8K_YAML = """include: {base}
task: gsm8k_local
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files: {{train: {data}, test: {data}}}
num_fewshot: 2
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 12
"""
PIQA_YAML = """include: {base}
task: piqa_local
dataset_path: parquet
dataset_name: null
dataset_kwargs:
  data_files: {{train: {data}, validation: {data}}}
"""


def _phrase(rng: random.Random, words: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory, words: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("lm_eval_tasks")
    rng = random.Random(3)
    qa = [{"question": _phrase(rng, words, 3, 8), "choices": [_phrase(rng, words, 1, 4) for _ in range(3)],
           "answer": rng.randrange(3)} for _ in range(6)]  # fmt: skip
    (root / "tiny_qa.yaml").write_text(QA_YAML.format(data=_write_jsonl(root / "qa.jsonl", qa)))
    docs = [{"text": _phrase(rng, words, 20, 60) + "."} for _ in range(3)]
    (root / "tiny_ppl.yaml").write_text(ROLLING_YAML.format(data=_write_jsonl(root / "ppl.jsonl", docs)))
    gen = [{"question": _phrase(rng, words, 2, 5), "answer": rng.choice(words)} for _ in range(4)]
    (root / "tiny_gen.yaml").write_text(GEN_YAML.format(data=_write_jsonl(root / "gen.jsonl", gen)))

    def arc_row(i: int) -> dict:
        labels = list("ABCD")
        return {"id": f"q{i}", "question": _phrase(rng, words, 4, 9) + "?",
                "choices": {"text": [_phrase(rng, words, 1, 4) for _ in labels], "label": labels},
                "answerKey": rng.choice(labels)}  # fmt: skip

    train = _write_jsonl(root / "arc_train.jsonl", [arc_row(i) for i in range(4)])
    test = _write_jsonl(root / "arc_test.jsonl", [arc_row(i) for i in range(5)])
    (root / "arc_easy_local.yaml").write_text(
        ARC_YAML.format(base=TASKS_DIR / "arc" / "arc_easy.yaml", train=train, test=test)
    )
    piqa = [{"goal": _phrase(rng, words, 3, 7), "sol1": _phrase(rng, words, 2, 6), "sol2": _phrase(rng, words, 2, 6),
             "label": rng.randrange(2)} for _ in range(5)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(piqa), root / "piqa.parquet")
    (root / "piqa_local.yaml").write_text(
        PIQA_YAML.format(base=TASKS_DIR / "piqa" / "piqa.yaml", data=root / "piqa.parquet")
    )
    gsm = [
        {
            "question": f"{_phrase(rng, words, 3, 8)} {i} + {i + 1}?",
            "answer": f"{_phrase(rng, words, 2, 5)}\n#### {2 * i + 1}",
        }
        for i in range(4)
    ]
    (root / "gsm8k_local.yaml").write_text(
        GSM8K_YAML.format(base=TASKS_DIR / "gsm8k" / "gsm8k.yaml", data=_write_jsonl(root / "gsm.jsonl", gsm))
    )
    (root / "hub_only.yaml").write_text(
        f"include: {TASKS_DIR / 'arc' / 'arc_easy.yaml'}\ntask: hub_only\n"
        "dataset_path: llm-pipeline-tests/not-in-any-cache\n"
    )
    return root


NAMES = ["tiny_qa", "tiny_ppl", "tiny_gen", "gsm8k_local", "arc_easy_local", "piqa_local"]


@pytest.fixture(scope="module")
def reference(tasks_dir: Path, model_dir: Path) -> dict:
    """lm-eval's own run: its ``hf`` model on our export (what ``lm_eval --model hf`` computes)."""
    from lm_eval.tasks import TaskManager

    monkey = pytest.MonkeyPatch()
    monkey.setenv("HF_DATASETS_OFFLINE", "1")
    monkey.setenv("HF_HUB_OFFLINE", "1")
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # our YAMLs include lm-eval's by path
    try:
        out = {}
        out["arc"] = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_dir},dtype=float32",
            tasks=["arc_easy_local"],
            num_fewshot=2,
            batch_size=4,
            device="cpu",
            bootstrap_iters=0,
            task_manager=manager,
        )["results"]
        out["rest"] = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_dir},dtype=float32",
            tasks=[n for n in NAMES if n != "arc_easy_local"],
            batch_size=4,
            device="cpu",
            bootstrap_iters=0,
            task_manager=manager,
        )
    finally:
        monkey.undo()
    return {**out["rest"]["results"], **out["arc"], "samples": out["rest"]["samples"]}


@pytest.fixture(scope="module")
def ours(tasks_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = {
        "tasks": ["lm_eval"],
        "device": "cpu",
        "lm_eval": {
            "tasks": ["tiny_qa", "tiny_ppl", "tiny_gen", "gsm8k_local", "local_suite"],
            "include_path": [str(tasks_dir)],
            "batch_size": 3,
            "offline": True,
            "suites": {"local_suite": [{"task": "arc_easy_local", "num_fewshot": 2, "metric": "acc"},
                                       {"task": "piqa_local"}, {"task": "hub_only"}]},
        },
    }  # fmt: skip
    out = tmp_path_factory.mktemp("ours")
    res = run_evals(model_dir, cfg, output=out)
    assert res.tasks["lm_eval"].status == "ok", res.tasks["lm_eval"].error
    samples = [json.loads(line) for line in (out / "samples" / "lm_eval.jsonl").read_text().splitlines()]
    return {**json.loads((out / "results.json").read_text()), "samples": samples}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "metrics"),
    [
        ("tiny_qa", ["acc", "acc_norm"]),
        ("tiny_ppl", ["word_perplexity", "byte_perplexity", "bits_per_byte"]),
        ("tiny_gen", ["exact_match"]),
        ("gsm8k_local", ["exact_match,strict-match", "exact_match,flexible-extract"]),
        ("arc_easy_local", ["acc", "acc_norm"]),
        ("piqa_local", ["acc", "acc_norm"]),
    ],
)
def test_our_backend_gives_lm_evals_numbers(reference: dict, ours: dict, task: str, metrics: list[str]) -> None:
    flat = ours["metrics"]["lm_eval"]
    for m in metrics:
        theirs = reference[task][m if "," in m else f"{m},none"]
        key = f"{task}.{metric_key(m if ',' in m else m + ',none')}"
        if m.startswith(("acc", "exact_match")):
            assert flat[key] == theirs, (task, m)  # the same answers, document by document
        else:
            assert flat[key] == pytest.approx(theirs, rel=1e-5), (task, m)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["tiny_gen", "gsm8k_local"])
def test_generation_gives_lm_evals_text(reference: dict, ours: dict, task: str) -> None:
    """Greedy generation on our KV-cache path writes HFLM's text, document by document (before and after
    the answer-extraction filters)."""
    theirs = {r["doc_id"]: r["filtered_resps"] for r in reference["samples"][task]}
    mine = {r["doc_id"]: r["resps"] for r in ours["samples"] if r["task"] == task}
    assert mine == theirs and len(mine) == 4


@pytest.mark.slow
def test_suite_average_leaves_out_what_is_unavailable(ours: dict, reference: dict) -> None:
    entry = ours["tasks"]["lm_eval"]["metrics"]
    suite = entry["suites"]["local_suite"]
    assert suite["n_tasks"] == 2 and suite["unavailable"] == ["hub_only"]
    want = (reference["arc_easy_local"]["acc,none"] + reference["piqa_local"]["acc_norm,none"]) / 2
    assert ours["metrics"]["lm_eval"]["local_suite.average"] == pytest.approx(want)
    assert "offline" in entry["unavailable"]["hub_only"]  # the data is not here: said so, with the fix
    assert "--include-path" in entry["unavailable"]["hub_only"]
    assert "hub_only.acc" not in ours["metrics"]["lm_eval"]  # never a 0


@pytest.mark.slow
def test_cli_runs_yaml_tasks_with_the_hf_backend(
    tasks_dir: Path, model_dir: Path, tmp_path: Path, reference: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``llm-pipeline eval CKPT --lm-eval TASKS --include-path DIR --backend hf``: lm-eval's own numbers
    in our results format (the default backend, ours, is compared above)."""
    from llm_pipeline.cli import main

    monkeypatch.chdir(tmp_path)  # no configs/eval.yaml here: the built-in defaults
    out = tmp_path / "out"
    args = ["eval", str(model_dir), "--lm-eval", "tiny_qa", "--include-path", str(tasks_dir), "--device", "cpu"]
    assert main([*args, "--backend", "hf", "--set", "lm_eval.offline=true", "--output", str(out)]) == 0
    got = json.loads((out / "results.json").read_text())["metrics"]["lm_eval"]
    assert got["tiny_qa.acc"] == reference["tiny_qa"]["acc,none"]
    assert got["tiny_qa.acc_norm"] == reference["tiny_qa"]["acc_norm,none"]


def test_a_stage_eval_list_can_name_lm_eval_suites() -> None:
    """What a pipeline stage's ``eval_set`` overrides carry: lm-eval names and suites, validated."""
    from llm_pipeline.config import load_config
    from llm_pipeline.eval.config import EvalConfig

    cfg = load_config(EvalConfig, None, ["tasks=[perplexity,lm_eval]", "lm_eval.tasks=[quick,arc_easy]"])
    assert cfg.tasks == ["perplexity", "lm_eval"] and cfg.section("lm_eval").tasks == ["quick", "arc_easy"]
