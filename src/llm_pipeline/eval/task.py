"""Evaluation tasks and their registry: a task is one module with its config, its runner and its headline.

A task subclasses :class:`EvalTask`: its ``config_class`` is the section of the eval config that bears the
task's name (``mmlu: {source: ..., timeout_s: ...}``), :meth:`EvalTask.run` scores a model and returns
``(metrics, samples)``, and ``headline`` names the metrics that summaries and the run report show.
:data:`EVAL_TASKS` maps the names used in ``tasks:`` and ``--tasks`` to ``"module:Class"``; modules are
imported on first use, so a task module keeps heavy imports (torch, datasets) inside its functions.

Adding a task is one module plus one entry (or, from outside the package, :func:`register_task`); the
runner, the eval config (sections, ``tasks:`` validation, ``--timeout``), the availability checks, the
results file and the report's headline columns all read the registry. See ``perplexity.py`` for a
task that needs a model and ``humaneval.py`` for one that can run without one. A family of tasks
(lm-evaluation-harness' registry, a suite) fits the same shape: one class whose ``run`` delegates to the
family, registered under each name it serves.
"""

from __future__ import annotations

import difflib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import Field

from llm_pipeline.config import StrictModel

if TYPE_CHECKING:
    from llm_pipeline.eval.budget import Budget
    from llm_pipeline.eval.model_handle import ModelHandle

#: Task name -> ``"module:Class"`` (or the class itself, for tasks registered at run time).
EVAL_TASKS: dict[str, str | type[EvalTask[Any]]] = {
    "perplexity": "llm_pipeline.eval.perplexity:PerplexityTask",
    "mmlu": "llm_pipeline.eval.multiple_choice:MMLUTask",
    "arc": "llm_pipeline.eval.multiple_choice:ARCTask",
    "hellaswag": "llm_pipeline.eval.multiple_choice:HellaSwagTask",
    "humaneval": "llm_pipeline.eval.humaneval:HumanEvalTask",
    "safety": "llm_pipeline.eval.safety:SafetyTask",
    # refusals on the embedded safety pairs' held-out prompts: new wordings of their requests (what DPO moves)
    "safety_heldout": "llm_pipeline.eval.safety:HeldOutSafetyTask",
    "arithmetic_accuracy": "llm_pipeline.eval.arithmetic:ArithmeticAccuracyTask",
    "lm_eval": "llm_pipeline.eval.harness:LMEvalTask",
    "chat_format": "llm_pipeline.eval.chat_format:ChatFormatTask",
    # the same perplexity, under its own name and section: a second held-out set (the LoRA demo's domain)
    "domain_perplexity": "llm_pipeline.eval.perplexity:PerplexityTask",
}


@dataclass(frozen=True)
class TaskFlag:
    """A shorthand ``llm-pipeline eval`` flag for one key of a task's section (the registry declares them, so
    the command line lists them without importing the task modules)."""

    flag: str  # e.g. "--mmlu"
    key: str  # the section's key it sets, e.g. "source"
    help: str
    kind: Literal["str", "int", "list", "names"] = "str"  # list: repeatable; names: comma-separated
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    #: giving the flag adds the task to the run (``--lm-eval NAMES`` runs the lm_eval eval)
    selects: bool = False
    #: with no --config, read configs/eval.yaml: the flag's values may name things defined there (suites)
    reads_default_config: bool = False

    def argparse_kwargs(self, task: str) -> dict[str, Any]:
        """``add_argument`` keywords; the value lands in ``<task>.<key>`` of the parsed namespace."""
        metavar = self.metavar or (None if self.choices else self.key.upper())
        kw: dict[str, Any] = {"dest": f"{task}.{self.key}", "help": self.help, "metavar": metavar}
        if self.kind == "list":
            kw["action"] = "append"
        if self.kind == "int":
            kw["type"] = int
        if self.choices:
            kw["choices"] = list(self.choices)
        return kw

    def value(self, raw: Any) -> Any:
        """The config value of the flag's command-line text (``names``: a comma-separated list)."""
        if self.kind == "names" and isinstance(raw, str):
            return [t.strip() for t in raw.split(",") if t.strip()] or None
        return raw


#: Task name -> its ``llm-pipeline eval`` shorthands (a task module's options, declared beside its entry).
EVAL_TASK_FLAGS: dict[str, tuple[TaskFlag, ...]] = {
    "humaneval": (
        TaskFlag("--samples", "samples", "HumanEval samples JSONL (task_id, completion) to score, not generate"),
        TaskFlag("--workers", "workers", "HumanEval programs run in parallel", kind="int"),
    ),
    "perplexity": (
        TaskFlag("--text", "files", "text/JSONL file for perplexity (repeatable)", kind="list", metavar="FILE"),
        TaskFlag("--packed-data", "packed_data", "packed token shards root for perplexity (held-out split)"),
    ),
    "mmlu": (TaskFlag("--mmlu", "source", "MMLU source: local CSV dir or hub id (default cais/mmlu)"),),
    "lm_eval": (
        TaskFlag("--lm-eval", "tasks", "comma-separated lm-evaluation-harness tasks, groups or suites (lm_eval.suites "
                 "in the config); runs the lm_eval eval (added to --tasks, or alone)", kind="names",
                 metavar="TASKS", selects=True, reads_default_config=True),
        TaskFlag("--include-path", "include_path", "folder of custom lm-eval task YAMLs (repeatable)", kind="list",
                 metavar="DIR"),
        TaskFlag("--backend", "backend", "lm-eval model: pipeline (ours, batched; default) or hf (lm-eval's HFLM on "
                 "the export, the reference)", choices=("pipeline", "hf")),
    ),
}  # fmt: skip

#: What runs when a config names no ``tasks``.
DEFAULT_TASKS: tuple[str, ...] = ("perplexity", "mmlu", "humaneval", "safety")

Metrics = dict[str, Any]
Samples = list[dict[str, Any]]


class TaskUnavailable(Exception):
    """Raised by :meth:`EvalTask.run` when what it needs turns out to be absent once it runs (data that
    does not load offline): the task is recorded as ``unavailable`` with this reason, never as a score."""


class TaskConfig(StrictModel):
    """The settings every task's section has; a task's config subclasses it."""

    timeout_s: float = Field(3600.0, gt=0, description="Wall-clock budget for this eval.")
    limit: int | None = Field(
        None, gt=0, description="At most this many samples for this eval (default: the suite's limit)."
    )


C = TypeVar("C", bound=TaskConfig)


@dataclass
class TaskContext:
    """What the runner hands a task: the model (loaded on first use), its budget and the suite's settings."""

    model: ModelHandle  # .get() -> (model, tokenizer); .completer(...) -> batched generation; .model_dir
    budget: Budget  # call .check() between batches, .set_total()/.advance() for progress
    limit: int | None  # at most this many samples (the task's ``limit``, else the suite's)
    seed: int


class EvalTask(ABC, Generic[C]):
    """One evaluation. Set the class attributes, implement :meth:`run`; the other hooks have defaults."""

    config_class: ClassVar[type[TaskConfig]] = TaskConfig
    #: Metrics shown for this task (summary table: the first; run report: all), as keys of :meth:`scalars`.
    headline: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, cfg: C) -> None:
        self.name = name
        self.cfg = cfg

    @abstractmethod
    def run(self, ctx: TaskContext) -> tuple[Metrics, Samples]:
        """Score the model: the task's metrics (JSON-able) and one record per scored sample."""

    def needs_model(self) -> bool:
        """False when this configuration scores without a model (e.g. HumanEval samples from a file)."""
        return True

    def unavailable(self) -> str | None:
        """Why this task cannot run on this machine with its settings (data missing...), with the fix; or None."""
        return None

    def run_defaults(self, run_dir: Path) -> dict[str, Any]:
        """Settings taken from the run folder the model belongs to, used when the task is unavailable as
        configured (perplexity: that run's held-out split). Keys the user set are never replaced."""
        return {}

    def scalars(self, metrics: Mapping[str, Any] | None) -> dict[str, float | int]:
        """The numbers gates and reports read (``results.json`` ``metrics.<task>.*``): top-level numbers."""
        if not metrics:
            return {}
        return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}

    def shown(self, scalars: Mapping[str, float | int]) -> list[str]:
        """The metrics of this result that summaries and the report card show (keys of :meth:`scalars`):
        the ``headline`` ones; a family of tasks whose metrics depend on its settings (lm-eval) overrides it."""
        return [m for m in self.headline if m in scalars]

    def count(self, scalars: Mapping[str, float | int]) -> int | None:
        """How many samples were scored, for the summary table."""
        n = scalars.get("n")
        return int(n) if n is not None else None

    def partial_reason(self, metrics: Mapping[str, Any]) -> str | None:
        """Why a result covers only part of its data (``metrics["partial"]``); None when it is complete."""
        if not metrics.get("partial"):
            return None
        cov = metrics.get("coverage")
        return f"scored {cov:.1%} of its data" if isinstance(cov, int | float) else "scored part of its data"


def task_names() -> tuple[str, ...]:
    """Every registered task, in registry order."""
    return tuple(EVAL_TASKS)


def unknown_task_message(name: str) -> str:
    hint = difflib.get_close_matches(name, list(EVAL_TASKS), n=1)
    guess = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown eval task {name!r}{guess}; known tasks: {', '.join(EVAL_TASKS)}"


def task_class(name: str) -> type[EvalTask[Any]]:
    """The task class registered under ``name`` (its module imported on first use)."""
    if name not in EVAL_TASKS:
        raise ValueError(unknown_task_message(name))
    target = EVAL_TASKS[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]
        except (ImportError, AttributeError) as e:
            raise ValueError(f"eval task {name!r}: cannot load {target} ({e})") from e
    return target


def register_task(name: str, target: str | type[EvalTask[Any]], flags: tuple[TaskFlag, ...] = ()) -> None:
    """Add (or replace) the task ``name``: ``"package.module:Class"`` or the class itself, with its
    ``llm-pipeline eval`` shorthands (registered before the command line is built)."""
    if not name.isidentifier():
        raise ValueError(f"eval task name {name!r} must be an identifier (it names a config section)")
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"eval task {name!r}: expected 'module:Class', got {target!r}")
    EVAL_TASKS[name] = target
    if flags:
        EVAL_TASK_FLAGS[name] = flags


def make_task(name: str, section: TaskConfig | None = None) -> EvalTask[Any]:
    """An instance of task ``name`` with its config section (the defaults when None)."""
    cls = task_class(name)
    return cls(name, section if section is not None else cls.config_class())


def headline_metrics(tasks: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Dotted ``results.json`` metric names (``mmlu.accuracy``) that summarise ``tasks`` (default: all
    registered), in registry order: the columns of the run report's evaluation table."""
    names = task_names() if tasks is None else tasks
    return [f"{name}.{metric}" for name in names for metric in task_class(name).headline]
