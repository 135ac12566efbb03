"""``results.json``: what an evaluation wrote, as one typed record read and written through this class.

The runner writes it (after every task, so a crash loses nothing finished); promotion gates, the
pipeline and the report read it back with :meth:`EvalResults.load`. On disk::

    model    the model directory scored (None: samples scored without a model)
    created  when the run started (UTC, ISO 8601); wall_s / model_load_s: how long it took
    host     python, torch, device
    metrics  {task: {"status": ..., <numbers>}}: the flat numbers gates name by dotted path
             (``mmlu.accuracy``, ``perplexity.perplexity``); the pipeline adds ``stage`` (``stage.loss``)
    tasks    {task: status, metrics (the task's full metrics), wall_s, timeout_s, progress, samples_file,
             error / warning}
    config   the resolved eval config

Files from earlier versions load unchanged; a file without ``metrics`` is read as its metrics (the oldest
layout), and unknown keys are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llm_pipeline.checkpoint.fsio import write_text_synced

TaskStatus = Literal["ok", "partial", "timed_out", "error", "unavailable"]


class _Record(BaseModel):
    """Keys this version does not know are kept (files written by newer or older versions still load)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class TaskProgress(_Record):
    completed: int = 0
    total: int | None = None
    phase: str = ""


class TaskResult(_Record):
    """One task of the run: how it ended and what it measured."""

    status: TaskStatus
    metrics: dict[str, Any] | None = Field(None, description="the task's full metrics; None unless it finished")
    timeout_s: float | None = None
    wall_s: float | None = None
    progress: TaskProgress | None = None
    samples_file: str | None = Field(None, description="one record per scored sample, relative to the results folder")
    error: str | None = Field(None, description="why it timed out, failed or is unavailable")
    warning: str | None = None


class HostInfo(_Record):
    python: str | None = None
    torch: str | None = None
    device: str | None = None
    git_commit: str | None = Field(None, description="the code's commit (+ '-dirty' with local changes)")
    lm_eval: str | None = Field(None, description="lm-evaluation-harness version, when installed")


class EvalResults(_Record):
    """An evaluation's ``results.json``."""

    model: str | None = None
    created: str | None = None
    host: HostInfo | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="{task: {status, numbers}}, read by gates")
    tasks: dict[str, TaskResult] = Field(default_factory=dict)
    config: dict[str, Any] | None = None
    wall_s: float | None = None
    model_load_s: float | None = None

    def record(self, name: str, result: TaskResult, scalars: dict[str, float | int]) -> None:
        """Add a finished (or failed, or unavailable) task: its entry and its flat numbers for gates."""
        self.tasks[name] = result
        self.metrics[name] = {"status": result.status, **scalars}

    def failed(self) -> list[str]:
        """Tasks that raised an error (a timed-out, partial or unavailable task is not a failure of the run)."""
        return [name for name, t in self.tasks.items() if t.status == "error"]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="python", exclude_none=False), indent=2, default=str) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a reader never sees half a file)."""
        p = Path(path)
        write_text_synced(p, self.to_json())
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EvalResults:
        """Read ``results.json`` (or the folder holding it), with errors that name the file."""
        p = Path(path)
        if p.is_dir():
            p = p / "results.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no evaluation results (run `llm-pipeline eval` first)")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected the JSON object `llm-pipeline eval` writes, got {type(data).__name__}")
        if "metrics" not in data and "tasks" not in data:  # the first results files held only the metrics
            data = {"metrics": data}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            where = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'top level'}: {err['msg']}" for err in e.errors())
            raise ValueError(f"{p}: not an evaluation results file ({where})") from None
