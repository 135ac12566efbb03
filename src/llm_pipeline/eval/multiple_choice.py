"""Multiple-choice evals scored by log-likelihood: MMLU (5-shot), ARC and HellaSwag.

Each question becomes one context and N continuations (``" " + choice``); the prediction is the
choice with the highest log-likelihood (``acc``) or the highest log-likelihood per character of
the choice (``acc_norm``, as ``lm-eval`` computes it). Prompts follow the EleutherAI harness:

MMLU (``mmlu_prompt``)::

    The following are multiple choice questions (with answers) about high school biology.

    <question>
    A. <choice 0>
    B. <choice 1>
    C. <choice 2>
    D. <choice 3>
    Answer: B

    ... (the first 5 questions of the subject's dev split, each followed by a blank line) ...
    <question>
    A. ...
    D. <choice 3>
    Answer:

and the continuations are " A", " B", " C", " D".
"""

from __future__ import annotations

import csv
import re
from abc import abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from llm_pipeline.eval.availability import hub_cached, hub_offline, hub_reachable
from llm_pipeline.eval.budget import Budget
from llm_pipeline.eval.records import read_records
from llm_pipeline.eval.task import EvalTask, Metrics, Samples, TaskConfig, TaskContext

if TYPE_CHECKING:
    import torch

MMLU_LETTERS = ("A", "B", "C", "D")
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
MMLU_SOURCE, ARC_SOURCE, HELLASWAG_SOURCE = "cais/mmlu", "allenai/ai2_arc", "Rowan/hellaswag"


class MultipleChoiceConfig(TaskConfig):
    """A log-likelihood multiple-choice task (MMLU, ARC, HellaSwag)."""

    source: str | None = Field(
        None,
        description="HF hub dataset id, or a local directory (MMLU: original CSV layout or cais/mmlu JSONL/Parquet), "
        "or 'builtin:python' (a small project-written set, MMLU layout). "
        f"Default: {MMLU_SOURCE}, {ARC_SOURCE} (ARC-Challenge), {HELLASWAG_SOURCE}.",
    )
    subset: str | None = Field(None, description="Hub config (e.g. 'ARC-Easy'); MMLU uses 'all' or per subject.")
    split: str | None = Field(None, description="Scored split (default: test for MMLU/ARC, validation for HellaSwag).")
    subjects: list[str] | None = Field(None, description="MMLU only: restrict to these subjects.")
    num_fewshot: int | None = Field(None, ge=0, description="Shots (default: 5 for MMLU, 0 otherwise).")
    batch_size: int = Field(16, gt=0, description="Log-likelihood requests per forward pass.")
    max_length: int | None = Field(None, gt=1, description="Context cap in tokens (default: model context).")


@dataclass
class MCQuestion:
    """One multiple-choice item: the text the model sees, its choices and the gold index."""

    query: str
    choices: list[str]
    gold: int
    group: str = ""
    uid: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# MMLU
# --------------------------------------------------------------------------------------------


def mmlu_query(question: str, choices: Sequence[str]) -> str:
    """One question in the harness layout, ending in ``Answer:``."""
    lines = [question.strip(), *(f"{letter}. {c}" for letter, c in zip(MMLU_LETTERS, choices, strict=True))]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_prompt(subject: str, shots: Sequence[dict[str, Any]], question: dict[str, Any]) -> str:
    """Description + answered shots + the open question (see the module docstring)."""
    parts = [mmlu_description(subject)]
    for s in shots:
        parts.append(mmlu_query(s["question"], s["choices"]) + TARGET_DELIMITER + MMLU_LETTERS[s["answer"]])
        parts.append(FEWSHOT_DELIMITER)
    parts.append(mmlu_query(question["question"], question["choices"]))
    return "".join(parts)


def _mmlu_answer(value: Any) -> int:
    if isinstance(value, str):
        value = value.strip()
        if value in MMLU_LETTERS:
            return MMLU_LETTERS.index(value)
        value = int(value)
    if not 0 <= int(value) < 4:
        raise ValueError(f"MMLU answer {value!r} is not one of A-D / 0-3")
    return int(value)


def _read_mmlu_csv(path: Path, subject: str) -> list[dict[str, Any]]:
    """Original MMLU CSV (Hendrycks et al.): no header; question, A, B, C, D, answer letter."""
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for n, rec in enumerate(csv.reader(f), 1):
            if len(rec) != 6:
                raise ValueError(f"{path}:{n}: expected 6 columns (question, A, B, C, D, answer), got {len(rec)}")
            rows.append({"question": rec[0], "choices": rec[1:5], "answer": _mmlu_answer(rec[5]), "subject": subject})
    return rows


def _find_split_file(root: Path, split: str) -> Path | None:
    for name in (f"{split}.jsonl", f"{split}.parquet", f"{split}.json"):
        for cand in (root / name, root / "data" / name):
            if cand.is_file():
                return cand
    return None


BUILTIN_PREFIX = "builtin:"


def builtin_mc_dir(name: str) -> Path:
    """A project-written multiple-choice set in the MMLU CSV layout (``builtin:python``: the stdlib)."""
    from importlib import resources

    root = Path(str(resources.files("llm_pipeline").joinpath("resources", "eval", f"mc_{name}")))
    if not root.is_dir():
        raise FileNotFoundError(f"no built-in multiple-choice set {name!r} (available: python)")
    return root


def load_mmlu(source: str, split: str = "test", *, subset: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Rows per subject from a local CSV directory, a local cais/mmlu JSONL/Parquet dir, a built-in set
    (``builtin:python``) or the hub."""
    root = builtin_mc_dir(source[len(BUILTIN_PREFIX) :]) if source.startswith(BUILTIN_PREFIX) else Path(source)
    if root.is_dir():
        for base in (root, root / "data"):
            csv_dir = base / split
            if csv_dir.is_dir() and any(csv_dir.glob(f"*_{split}.csv")):
                out = {}
                for p in sorted(csv_dir.glob(f"*_{split}.csv")):
                    subject = p.name[: -len(f"_{split}.csv")]
                    out[subject] = _read_mmlu_csv(p, subject)
                return out
        found = _find_split_file(root, split)
        if found is None:
            raise FileNotFoundError(
                f"{root}: no MMLU '{split}' data: expected {split}/<subject>_{split}.csv (original layout) "
                f"or {split}.jsonl / {split}.parquet (cais/mmlu columns: question, subject, choices, answer)"
            )
        rows = read_records(found)
    else:
        rows = _load_hub(source, subset or "all", split)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r["subject"]].append(
            {"question": r["question"], "choices": list(r["choices"]), "answer": _mmlu_answer(r["answer"])}
        )
    return dict(sorted(out.items()))


def looks_like_local_path(name: str) -> bool:
    """A source that can only mean a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``data/x`` where
    ``data/`` exists here, a file suffix): it is never looked up on the hub."""
    if name.startswith(("/", "./", "../", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if name.lower().endswith((".csv", ".jsonl", ".json", ".parquet", ".gz", ".txt")):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).is_dir()


def _load_hub(name: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    if looks_like_local_path(name):
        raise FileNotFoundError(f"{name}: no such local file or directory (a path is never looked up on the HF hub)")
    if "/" not in name:
        raise FileNotFoundError(f"{name}: neither a local directory nor a hub dataset id (owner/name)")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is an eval extra
        raise ValueError("loading from the HF hub needs the `datasets` package (pip install datasets)") from e
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # the hub raises many types (network, missing config, auth)
        raise ValueError(f"could not load {name} ({subset}, split {split}) from the HF hub: {e}") from None
    return list(ds)


def mmlu_questions(cfg: MultipleChoiceConfig, limit: int | None) -> list[MCQuestion]:
    """Build the 5-shot questions; ``limit`` caps questions per subject (as ``lm-eval --limit``)."""
    source = cfg.source or MMLU_SOURCE
    test = load_mmlu(source, cfg.split or "test", subset=cfg.subset)
    shots_needed = 5 if cfg.num_fewshot is None else cfg.num_fewshot
    dev = load_mmlu(source, "dev", subset=cfg.subset) if shots_needed else {}
    subjects = cfg.subjects or list(test)
    unknown = sorted(set(subjects) - set(test))
    if unknown:
        raise ValueError(f"unknown MMLU subjects {unknown}; available: {', '.join(test)}")
    out = []
    for subject in subjects:
        shots = dev.get(subject, [])[:shots_needed]
        if len(shots) < shots_needed:
            raise ValueError(f"MMLU subject {subject}: {shots_needed} shots requested, dev split has {len(shots)}")
        for i, q in enumerate(test[subject][:limit]):
            out.append(
                MCQuestion(
                    query=mmlu_prompt(subject, shots, q),
                    choices=list(MMLU_LETTERS),
                    gold=q["answer"],
                    group=subject,
                    uid=f"{subject}/{i}",
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# ARC and HellaSwag (zero-shot by default, as in the harness)
# --------------------------------------------------------------------------------------------


def _rows(cfg: MultipleChoiceConfig, default_source: str, default_subset: str | None, split: str) -> list[dict]:
    source = cfg.source or default_source
    path = Path(source)
    if path.is_file():
        return read_records(path)
    if path.is_dir():
        found = _find_split_file(path, split)
        if found is None:
            raise FileNotFoundError(f"{path}: no {split}.jsonl or {split}.parquet")
        return read_records(found)
    return _load_hub(source, cfg.subset or default_subset, split)


def _shot_rows(cfg: MultipleChoiceConfig, default_source: str, default_subset: str | None) -> list[dict]:
    """Training-split rows for few-shot examples (never the scored file itself)."""
    n = cfg.num_fewshot or 0
    if n and cfg.source and Path(cfg.source).is_file():
        raise ValueError(
            f"{cfg.source}: few-shot examples need a train split; point source to a directory with "
            "test.jsonl and train.jsonl, or set num_fewshot=0"
        )
    return _rows(cfg, default_source, default_subset, "train")[:n] if n else []


def _with_shots(questions: list[MCQuestion], shots: list[MCQuestion]) -> list[MCQuestion]:
    if not shots:
        return questions
    prefix = "".join(s.query + TARGET_DELIMITER + s.choices[s.gold] + FEWSHOT_DELIMITER for s in shots)
    for q in questions:
        q.query = prefix + q.query
    return questions


def arc_question(row: dict[str, Any], uid: str = "") -> MCQuestion:
    labels = list(row["choices"]["label"])
    return MCQuestion(
        query=f"Question: {row['question']}\nAnswer:",
        choices=list(row["choices"]["text"]),
        gold=labels.index(row["answerKey"]),
        uid=uid or str(row.get("id", "")),
    )


def arc_questions(cfg: MultipleChoiceConfig, limit: int | None) -> list[MCQuestion]:
    rows = _rows(cfg, ARC_SOURCE, "ARC-Challenge", cfg.split or "test")
    qs = [arc_question(r, str(r.get("id", i))) for i, r in enumerate(rows[:limit])]
    shots = [arc_question(r) for r in _shot_rows(cfg, ARC_SOURCE, "ARC-Challenge")]
    return _with_shots(qs, shots)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_question(row: dict[str, Any], uid: str = "") -> MCQuestion:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return MCQuestion(
        query=_hellaswag_clean(row["activity_label"] + ": " + ctx),
        choices=[_hellaswag_clean(e) for e in row["endings"]],
        gold=int(row["label"]),
        uid=uid,
    )


def hellaswag_questions(cfg: MultipleChoiceConfig, limit: int | None) -> list[MCQuestion]:
    rows = _rows(cfg, HELLASWAG_SOURCE, None, cfg.split or "validation")
    qs = [hellaswag_question(r, str(r.get("ind", i))) for i, r in enumerate(rows[:limit])]
    shots = [hellaswag_question(r) for r in _shot_rows(cfg, HELLASWAG_SOURCE, None)]
    return _with_shots(qs, shots)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def score_questions(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    budget: Budget | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy (and length-normalised accuracy) overall, per group, macro over groups; per-question records."""
    import torch

    from llm_pipeline.eval.loglik import encode_pair, loglikelihood

    requests, owners = [], []
    for qi, q in enumerate(questions):
        for choice in q.choices:
            requests.append(encode_pair(tokenizer, q.query, TARGET_DELIMITER + choice))
            owners.append(qi)
    if budget is not None:
        budget.set_total(len(requests))
    lls = loglikelihood(model, requests, batch_size=batch_size, max_length=max_length, budget=budget)
    per_q: list[list[float]] = [[] for _ in questions]
    for owner, (ll, _) in zip(owners, lls, strict=True):
        per_q[owner].append(ll)
    samples = []
    for q, scores in zip(questions, per_q, strict=True):
        t = torch.tensor(scores)
        pred = int(t.argmax())
        lengths = torch.tensor([float(len(c)) for c in q.choices])
        pred_norm = int((t / lengths).argmax())
        samples.append(
            {
                "id": q.uid,
                "group": q.group,
                "query": q.query.rsplit(FEWSHOT_DELIMITER, 1)[-1],
                "choices": q.choices,
                "gold": q.gold,
                "loglikelihoods": scores,
                "pred": pred,
                "pred_norm": pred_norm,
                "correct": pred == q.gold,
                "correct_norm": pred_norm == q.gold,
            }
        )
    return accuracy_metrics(samples), samples


def accuracy_metrics(samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """``accuracy`` over all questions (micro), ``accuracy_macro`` (mean over groups), per-group values."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    rows = list(samples)
    for s in rows:
        groups[s["group"]].append(s)

    def acc(rs: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in rs) / len(rs) if rs else float("nan")

    per_group = {
        g: {"accuracy": acc(rs, "correct"), "accuracy_norm": acc(rs, "correct_norm"), "n": len(rs)}
        for g, rs in sorted(groups.items())
    }
    metrics: dict[str, Any] = {
        "accuracy": acc(rows, "correct"),
        "accuracy_norm": acc(rows, "correct_norm"),
        "n": len(rows),
    }
    if any(groups):
        metrics["accuracy_macro"] = sum(v["accuracy"] for v in per_group.values()) / len(per_group)
        metrics["per_group"] = per_group
    return metrics


class MultipleChoiceTask(EvalTask[MultipleChoiceConfig]):
    """Questions built from the task's source, scored by log-likelihood of each choice."""

    config_class = MultipleChoiceConfig
    headline = ("accuracy_norm",)
    hub_default: ClassVar[str] = ""
    local_flag: ClassVar[str] = ""  # how to point the task at local data instead of the hub

    @abstractmethod
    def questions(self, limit: int | None) -> list[MCQuestion]:
        """The scored questions (at most ``limit`` of them, per group for MMLU), few-shot prompts included."""

    def run(self, ctx: TaskContext) -> tuple[Metrics, Samples]:
        questions = self.questions(ctx.limit)
        model, tokenizer = ctx.model.get()
        return score_questions(
            model,
            tokenizer,
            questions,
            batch_size=self.cfg.batch_size,
            max_length=self.cfg.max_length,
            budget=ctx.budget,
        )

    def unavailable(self) -> str | None:
        source = self.cfg.source or self.hub_default
        if source.startswith(BUILTIN_PREFIX) or Path(source).exists():
            return None
        if looks_like_local_path(source):
            return f"{source}: not found"
        if hub_cached(source) or hub_reachable():
            return None
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub is not reachable from here"
        return f"{source} is on the HF hub, {why} and it is not in the local cache: pass {self.local_flag}"


class MMLUTask(MultipleChoiceTask):
    """MMLU, 5-shot, as lm-evaluation-harness scores it (``limit``: questions per subject)."""

    headline = ("accuracy",)
    hub_default = MMLU_SOURCE
    local_flag = "--mmlu DIR (the CSV release) or --mmlu builtin:python"

    def questions(self, limit: int | None) -> list[MCQuestion]:
        return mmlu_questions(self.cfg, limit)


class ARCTask(MultipleChoiceTask):
    """ARC (Challenge by default), zero-shot."""

    hub_default = ARC_SOURCE
    local_flag = "--set arc.source=FILE.jsonl"

    def questions(self, limit: int | None) -> list[MCQuestion]:
        return arc_questions(self.cfg, limit)


class HellaSwagTask(MultipleChoiceTask):
    """HellaSwag (validation split), zero-shot."""

    hub_default = HELLASWAG_SOURCE
    local_flag = "--set hellaswag.source=FILE.jsonl"

    def questions(self, limit: int | None) -> list[MCQuestion]:
        return hellaswag_questions(self.cfg, limit)
