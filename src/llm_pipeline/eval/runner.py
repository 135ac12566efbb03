"""Run the selected evals on one model directory, each under its own wall-clock budget.

``run_evals(model_dir, cfg, output=...)`` is the library entry point (the CLI, the pipeline and the
demo call it). Each task comes from the registry (:mod:`llm_pipeline.eval.task`). It writes
``results.json`` (:class:`~llm_pipeline.eval.results.EvalResults`, updated after every eval, so a crash
loses nothing finished), one ``samples/<task>.jsonl`` per eval and the resolved ``eval_config.yaml``,
shows a progress bar per eval on a terminal (a line per eval, with timings, when the output goes to a
file or pipe) and prints a summary table. An eval that runs out of time is reported as ``timed_out``
with how far it got, never as a zero score; an eval that fails is reported as ``error``; the others run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llm_pipeline.config import config_to_dict, load_config, save_config, validate_config
from llm_pipeline.eval.budget import Budget, EvalTimeout
from llm_pipeline.eval.config import EvalConfig
from llm_pipeline.eval.harness import lm_eval_version
from llm_pipeline.eval.model_handle import ModelHandle, resolve_device
from llm_pipeline.eval.results import EvalResults, HostInfo, TaskProgress, TaskResult
from llm_pipeline.eval.task import EvalTask, TaskContext, TaskUnavailable, make_task

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int | None, str], None]  # (completed, total, phase), what a Budget reports

#: Seconds between progress lines when the output is not a terminal (a log file, a pipe, CI).
PROGRESS_EVERY_S = 30.0


def git_commit() -> str | None:
    """The commit of the code that runs (``-dirty`` when it has uncommitted changes); None outside git."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha or None


def resolve_config(cfg: EvalConfig | Mapping[str, Any] | str | os.PathLike[str] | None) -> EvalConfig:
    """An ``EvalConfig`` from itself, a mapping, a YAML path, or None (all defaults)."""
    if isinstance(cfg, EvalConfig):
        return cfg
    if cfg is None:
        return EvalConfig()
    if isinstance(cfg, Mapping):
        return validate_config(EvalConfig, cfg, "<eval config>")
    return load_config(EvalConfig, cfg)


class _Reporter:
    """Progress bars on a terminal; elsewhere (a log file, a pipe) a line per event with its timing."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.bars = (
            Progress(
                TextColumn("{task.description:<24}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            if self.live
            else None
        )

    def __enter__(self) -> _Reporter:
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()

    def say(self, text: str) -> None:
        self.console.print(f"eval: {text}", markup=False, highlight=False, soft_wrap=True)

    def start(self, task: str, timeout_s: float) -> tuple[ProgressFn, Callable[[str], None]]:
        """(the budget's progress callback, a function that closes the task's bar or line with its outcome)."""
        started = time.monotonic()
        if self.bars is not None:
            bars, bar = self.bars, self.bars.add_task(task, total=None)

            def update(done: int, total: int | None, phase: str) -> None:
                bars.update(bar, completed=done, total=total, description=f"{task} [{phase}]" if phase else task)

            def close(outcome: str) -> None:
                bars.update(bar, description=f"{task} [{outcome.split(' ', 1)[0]}]")
                bars.stop_task(bar)

            return update, close
        self.say(f"{task}: started (budget {timeout_s:g}s)")
        last = [started]

        def line(done: int, total: int | None, phase: str) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S:
                last[0] = now
                of = f"/{total}" if total is not None else ""
                self.say(f"{task}: {phase + ' ' if phase else ''}{done}{of} after {now - started:.0f}s")

        def done(outcome: str) -> None:
            self.say(f"{task}: {outcome}")

        return line, done


def run_evals(
    model_dir: str | os.PathLike[str] | None,
    cfg: EvalConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    console: Console | None = None,
    unavailable: Mapping[str, str] | None = None,
) -> EvalResults:
    """Run ``cfg.tasks`` on the HF model directory ``model_dir``; returns (and writes) the results.

    ``results.tasks[name]`` holds ``status`` (ok / partial / timed_out / error / unavailable), ``metrics``
    (None unless it finished; a ``partial`` eval scored only part of its data, e.g. HumanEval samples for
    some problems), ``wall_s``, ``progress`` and ``samples_file``; ``results.metrics[name]`` its status and
    numbers (what gates read). Tasks named in ``unavailable`` (task -> reason) are recorded as such, not run.
    ``model``/``tokenizer`` may be passed in already loaded. ``cfg`` may be an ``EvalConfig``, a mapping of
    its fields, or a YAML path (``configs/demo/eval.yaml``). Loading the model is not charged to any
    eval's budget.
    """
    cfg = resolve_config(cfg)
    unavailable = unavailable or {}
    console = console or Console(stderr=True)
    out_dir = Path(output) if output is not None else None
    if out_dir is not None:
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "eval_config.yaml")
    handle = ModelHandle(
        Path(model_dir) if model_dir is not None else None,
        device=cfg.device,
        dtype=cfg.dtype,
        model=model,
        tokenizer=tokenizer,
    )
    results = EvalResults(
        model=str(model_dir) if model_dir is not None else None,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        host=HostInfo(
            python=platform.python_version(),
            torch=torch.__version__,
            device=str(resolve_device(cfg.device)),
            git_commit=git_commit(),
            lm_eval=lm_eval_version(),
        ),
        config=config_to_dict(cfg),
    )
    started = time.monotonic()
    with _Reporter(console) as reporter:
        for name in dict.fromkeys(cfg.tasks):  # keep order, drop duplicates
            task = make_task(name, cfg.section(name))
            if name in unavailable:
                results.record(name, TaskResult(status="unavailable", error=unavailable[name]), {})
            else:
                result, samples = _run_task(task, cfg, handle, reporter, results)
                if out_dir is not None and samples:
                    path = out_dir / "samples" / f"{name}.jsonl"
                    with path.open("w", encoding="utf-8") as f:
                        f.writelines(json.dumps(s, default=str) + "\n" for s in samples)
                    result.samples_file = str(path.relative_to(out_dir))
                results.record(name, result, task.scalars(result.metrics))
            results.wall_s = round(time.monotonic() - started, 3)
            if out_dir is not None:
                results.save(out_dir / "results.json")
    console.print(summary_table(results))
    for name, entry in results.tasks.items():
        if entry.status not in ("ok", "unavailable"):
            console.print(
                f"[yellow]{name}: {entry.status}: {entry.error or entry.warning or ''}[/yellow]", soft_wrap=True
            )
    return results


def _run_task(
    task: EvalTask[Any], cfg: EvalConfig, handle: ModelHandle, reporter: _Reporter, results: EvalResults
) -> tuple[TaskResult, list[dict[str, Any]]]:
    """One task under its budget; whatever goes wrong becomes its status, never the others' problem."""
    timeout_s = task.cfg.timeout_s
    on_progress, close = reporter.start(task.name, timeout_s)
    budget = Budget(timeout_s, on_progress=on_progress)
    result = TaskResult(status="ok", timeout_s=timeout_s)
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    try:
        if task.needs_model():
            if not handle.loaded:  # load once, before the budget starts
                reporter.say(f"loading the model from {handle.model_dir}")
                t0 = time.monotonic()
                handle.get()
                results.model_load_s = round(time.monotonic() - t0, 3)
                reporter.say(f"model loaded in {results.model_load_s:.1f}s")
                start = time.monotonic()
            budget = Budget(timeout_s, on_progress=on_progress)
        result.metrics, samples = task.run(TaskContext(handle, budget, task.cfg.limit or cfg.limit, cfg.seed))
        if reason := task.partial_reason(result.metrics):
            result.status = "partial"
            result.warning = (
                f"{reason}; promotion gates treat a partial result as missing unless the rule sets allow_partial"
            )
    except EvalTimeout as e:
        result.status, result.error = "timed_out", str(e)
    except TaskUnavailable as e:
        result.status, result.error = "unavailable", str(e)
    except Exception as e:  # one broken eval (bad data, OOM...) must not stop the others
        log.debug("eval %s failed", task.name, exc_info=True)
        result.status, result.error = "error", f"{type(e).__name__}: {e}"
    result.wall_s = round(time.monotonic() - start, 3)
    result.progress = TaskProgress(completed=budget.completed, total=budget.total, phase=budget.phase)
    close(_outcome(task, result))
    return result, samples


def _outcome(task: EvalTask[Any], result: TaskResult) -> str:
    """``ok in 12.3s (accuracy 0.2500)``: a task's end, for progress lines."""
    text = f"{result.status} in {result.wall_s:.1f}s"
    scalars = task.scalars(result.metrics)
    shown = [f"{m} {scalars[m]:.4g}" for m in task.shown(scalars)[:4]]
    return text + (f" ({', '.join(shown)})" if shown else "")


def summary_table(results: EvalResults) -> Table:
    table = Table(title=f"eval: {results.model or 'samples'}")
    for col in ("eval", "status", "metric", "value", "n", "time"):
        table.add_column(col, justify="right" if col in ("value", "n", "time") else "left")
    for name, entry in results.tasks.items():
        task = make_task(name)
        scalars = task.scalars(entry.metrics)
        metric = next(iter(task.shown(scalars)), task.headline[0] if task.headline else "")
        value = scalars.get(metric)
        n: int | str | None = task.count(scalars)
        if entry.status == "unavailable":
            n = None
        elif entry.status != "ok":
            prog = entry.progress or TaskProgress()
            n = f"{prog.completed}/{prog.total if prog.total is not None else '?'}"
        shown = "-" if value is None else f"{value:.4f}"
        wall = "-" if entry.wall_s is None else f"{entry.wall_s:.1f}s"
        table.add_row(name, entry.status, metric, shown, str(n if n is not None else "-"), wall)
    return table
