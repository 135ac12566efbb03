"""Experiment trackers: one interface for every place the training metrics go.

``training.trackers`` lists them, several at once: ``jsonl`` (``metrics.jsonl``, always: the report
and the pipeline read it), ``tensorboard``, and the optional ``wandb``, ``mlflow`` and ``trackio``
(``pip install 'llm-pipeline[trackers]'``; ``training.tracking`` holds their options). Each is a
:class:`Tracker`: opened once per run on rank 0, given every logged line (the same values, at the same
step, as ``metrics.jsonl``: ``<split>/<metric>``, e.g. ``train/loss``), and closed with the run's
outcome, also when the run crashes. :func:`register_tracker` adds another one.

A run that resumes continues the same tracker runs: their ids are kept in ``<logging_dir>/trackers.json``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from llm_pipeline.config import ConfigError, StrictModel

log = logging.getLogger(__name__)

#: How a run ended, as the trackers are told: the trainer's status, or "failed" when it raised.
Outcome = Literal["completed", "preempted", "diverged", "failed"]

STATE_FILE = "trackers.json"


# ---- options (training.tracking) ------------------------------------------------------------------


class WandbOptions(StrictModel):
    """``training.tracking.wandb``: where the W&B run goes (``wandb login`` or WANDB_API_KEY for online runs)."""

    project: str = Field("llm-pipeline", min_length=1, description="W&B project.")
    entity: str | None = Field(None, description="W&B team or user; null = your default entity.")
    group: str | None = Field(None, description="Group of runs (e.g. one pipeline run's stages).")
    tags: list[str] = Field(default_factory=list, description="Run tags.")
    mode: Literal["online", "offline"] | None = Field(
        None, description="offline: write only to <dir>/wandb (`wandb sync` later); null = WANDB_MODE, else online."
    )
    dir: Path | None = Field(None, description="Where wandb/ run folders go; null = WANDB_DIR, else logging_dir.")


class MlflowOptions(StrictModel):
    """``training.tracking.mlflow``: the tracking server or local store and the experiment."""

    tracking_uri: str | None = Field(
        None,
        description="http(s)://server, sqlite:///file.db or file:///folder; null = MLFLOW_TRACKING_URI, else "
        "MLflow's default.",
    )
    experiment: str = Field("llm-pipeline", min_length=1, description="Experiment name (created when missing).")
    tags: dict[str, str] = Field(default_factory=dict, description="Run tags.")


class TrackioOptions(StrictModel):
    """``training.tracking.trackio``: the local store is TRACKIO_DIR (default ~/.cache/huggingface/trackio)."""

    project: str = Field("llm-pipeline", min_length=1, description="Trackio project.")
    group: str | None = Field(None, description="Group of runs.")


class TrackingConfig(StrictModel):
    """``training.tracking``: the options of the trackers listed in ``training.trackers``."""

    run_name: str | None = Field(None, description="Run name in W&B, MLflow and trackio; null = the stage kind.")
    wandb: WandbOptions = Field(default_factory=lambda: WandbOptions())
    mlflow: MlflowOptions = Field(default_factory=lambda: MlflowOptions())
    trackio: TrackioOptions = Field(default_factory=lambda: TrackioOptions())

    def check_used_by(self, trackers: list[str]) -> None:
        """Options of a tracker that is not listed would be ignored: refuse them (defaults are fine, so a saved
        resolved config validates again)."""
        for name in ("wandb", "mlflow", "trackio"):
            options = getattr(self, name)
            if name not in trackers and options != type(options)():
                raise ValueError(
                    f"training.tracking.{name} is set but {name!r} is not in training.trackers ({trackers}); "
                    f"add it there or remove the options"
                )


@dataclass(frozen=True)
class TrackerSpec:
    """A registered tracker: its class (``"package.module:Class"``, imported on first use) and, for an
    optional one, the package it needs and the ``llm-pipeline`` extra that installs it."""

    target: str
    package: str | None = None
    extra: str | None = None


TRACKERS: dict[str, TrackerSpec] = {
    "jsonl": TrackerSpec("llm_pipeline.train.trackers:JsonlTracker"),
    "tensorboard": TrackerSpec("llm_pipeline.train.trackers:TensorBoardTracker"),
    "wandb": TrackerSpec("llm_pipeline.train.trackers:WandbTracker", package="wandb", extra="wandb"),
    "mlflow": TrackerSpec("llm_pipeline.train.trackers:MlflowTracker", package="mlflow", extra="mlflow"),
    "trackio": TrackerSpec("llm_pipeline.train.trackers:TrackioTracker", package="trackio", extra="trackio"),
}


def register_tracker(name: str, target: str, *, package: str | None = None, extra: str | None = None) -> None:
    """Add (or replace) a tracker: ``target`` is ``"package.module:Class"`` of a :class:`Tracker` subclass."""
    module, sep, cls = target.partition(":")
    if not name or not sep or not module or not cls:
        raise ValueError(f"register_tracker({name!r}, {target!r}): expected a name and 'package.module:Class'")
    TRACKERS[name] = TrackerSpec(target, package, extra)


def check_tracker_names(names: Sequence[str]) -> list[str]:
    """``training.trackers`` as given, or a ValueError naming the unknown, repeated or missing entry."""
    names = list(names)
    for n in names:
        if n not in TRACKERS:
            hint = difflib.get_close_matches(str(n), list(TRACKERS), n=1)
            raise ValueError(
                f"unknown tracker {n!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                f"known trackers: {', '.join(TRACKERS)}"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tracker(s) listed twice: {', '.join(repeated)}")
    if "jsonl" not in names:
        raise ValueError(
            "keep 'jsonl' in training.trackers: metrics.jsonl is the run's record (the report, the pipeline's "
            f"gates and resumes read it); got {names}"
        )
    return names


class TrackerUnavailable(ConfigError):
    """An optional tracker's package is not installed; the message names the extra that installs it."""


def require_tracker_packages(names: Sequence[str]) -> None:
    """Refuse, before any training, a tracker whose package is missing (one line: what to install)."""
    for name in names:
        spec = TRACKERS[name]
        if spec.package is not None and importlib.util.find_spec(spec.package) is None:
            raise TrackerUnavailable(_missing(name, spec))


def _missing(name: str, spec: TrackerSpec) -> str:
    install = f"pip install 'llm-pipeline[{spec.extra}]'" if spec.extra else f"pip install {spec.package}"
    return f"training.trackers lists {name!r} but the {spec.package} package is not installed: {install}"


@dataclass(frozen=True)
class RunInfo:
    """What every tracker records about the run besides its metrics."""

    log_dir: Path  # the run's logging_dir (metrics.jsonl, TensorBoard, trackers.json)
    stage: str  # the stage kind (pretrain, sft, dpo, lora), or "train" for a bare Trainer
    config: dict[str, Any] = field(default_factory=dict)  # the run's resolved config (config_to_dict)
    options: TrackingConfig = field(default_factory=TrackingConfig)
    start_step: int = 0

    @property
    def run_name(self) -> str:
        return self.options.run_name or self.stage

    @property
    def recorded_config(self) -> dict[str, Any]:
        """The config as the trackers store it: the run's config plus the stage kind."""
        return {"stage": self.stage, **self.config}


class Tracker(ABC):
    """One destination of the training metrics. Opened on rank 0 only; ``log`` gets every logged line."""

    name: ClassVar[str]
    #: True: a failure to log stops the run (the run's record); False: the tracker is switched off with a
    #: warning and the run goes on (a tracker server that is down must not cost a week of training).
    critical: ClassVar[bool] = False

    @abstractmethod
    def __init__(self, run: RunInfo, resume: Mapping[str, Any] | None) -> None:
        """Open (``resume``: what :meth:`state` returned in the run this one resumes, to continue its run)."""

    @abstractmethod
    def log(self, step: int, split: str, metrics: Mapping[str, float], when: float) -> None:
        """One logged line: ``split`` is "train" or "eval"; ``when`` its wall-clock time (seconds)."""

    @abstractmethod
    def close(self, outcome: Outcome) -> None:
        """Flush and finish the tracker's run, recording how the training run ended."""

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue this tracker's run (kept in ``trackers.json``)."""
        return {}


def finite(metrics: Mapping[str, float]) -> dict[str, float]:
    """The finite values (a NaN loss of a window of skipped steps stays in metrics.jsonl only)."""
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"training.learning_rate": 3e-4, ...}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---- the built-in trackers -----------------------------------------------------------------------


class JsonlTracker(Tracker):
    """``metrics.jsonl``: one object per line, ``{"step", "split", "time", <metric>: value}``, flushed each line."""

    name = "jsonl"
    critical = True

    def __init__(self, run: RunInfo, resume: Mapping[str, Any] | None) -> None:
        self.path = run.log_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def log(self, step: int, split: str, metrics: Mapping[str, float], when: float) -> None:
        self._file.write(json.dumps({"step": step, "split": split, "time": when, **metrics}) + "\n")
        self._file.flush()

    def close(self, outcome: Outcome) -> None:
        self._file.close()


class TensorBoardTracker(Tracker):
    """TensorBoard scalars ``<split>/<metric>`` in the logging folder, flushed after each line."""

    name = "tensorboard"

    def __init__(self, run: RunInfo, resume: Mapping[str, Any] | None) -> None:
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # a dependency, but a broken install should not stop training
            log.warning("TensorBoard logging off (%s); metrics.jsonl is still written", e)
            return
        self._tb = SummaryWriter(log_dir=str(run.log_dir))

    def log(self, step: int, split: str, metrics: Mapping[str, float], when: float) -> None:
        if self._tb is None:
            return
        for k, v in finite(metrics).items():
            self._tb.add_scalar(f"{split}/{k}", v, step, walltime=when)
        self._tb.flush()

    def close(self, outcome: Outcome) -> None:
        if self._tb is not None:
            self._tb.close()


class WandbTracker(Tracker):
    """Weights & Biases: one run per training run (``job_type`` and ``config.stage``: the stage kind).

    ``mode: offline`` (or WANDB_MODE=offline) writes the run to ``<dir>/wandb/offline-run-*`` without any
    network access; ``wandb sync`` uploads it later. A resumed training run continues the same W&B run.
    """

    name = "wandb"

    def __init__(self, run: RunInfo, resume: Mapping[str, Any] | None) -> None:
        import wandb

        o = run.options.wandb
        root = o.dir or (Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else run.log_dir)
        root.mkdir(parents=True, exist_ok=True)
        kw: dict[str, Any] = {}
        if resume and resume.get("id"):
            kw = {"id": resume["id"], "resume": "allow"}
        self._run = wandb.init(
            project=o.project,
            entity=o.entity,
            group=o.group,
            tags=o.tags or None,
            name=run.run_name,
            job_type=run.stage,
            config=run.recorded_config,
            dir=str(root),
            mode=o.mode,
            allow_val_change=True,  # a resume may change training settings
            reinit="create_new",  # a pipeline trains its stages one after the other in one process
            **kw,
        )

    def log(self, step: int, split: str, metrics: Mapping[str, float], when: float) -> None:
        self._run.log({f"{split}/{k}": v for k, v in finite(metrics).items()}, step=step)

    def close(self, outcome: Outcome) -> None:
        if outcome == "preempted":
            self._run.mark_preempting()
        self._run.finish(exit_code=0 if outcome in ("completed", "preempted") else 1)

    def state(self) -> dict[str, Any]:
        return {"id": self._run.id, "project": self._run.project}


class MlflowTracker(Tracker):
    """MLflow: a run in ``experiment`` tagged ``stage``; the config as params (dotted keys) and as
    ``config.yaml``; metrics ``<split>/<metric>`` with their step; status FINISHED, KILLED (preempted) or FAILED.

    Uses ``MlflowClient`` with the run's id (no global active run), so nothing else in the process is touched.
    """

    name = "mlflow"
    _STATUS: ClassVar[dict[str, str]] = {
        "completed": "FINISHED", "preempted": "KILLED", "diverged": "FAILED", "failed": "FAILED",
    }  # fmt: skip
    _MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
    _PARAMS_PER_BATCH = 100  # and on params per log_batch call

    def __init__(self, run: RunInfo, resume: Mapping[str, Any] | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        o = run.options.mlflow
        uri = o.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self._client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        params = {k: str(v)[: self._MAX_PARAM_CHARS] for k, v in flatten(run.recorded_config).items()}
        if resume and resume.get("run_id") and resume.get("tracking_uri") == uri:
            self.run_id = str(resume["run_id"])
            old = self._client.get_run(self.run_id).data.params
            self._client.update_run(self.run_id, status="RUNNING")
            changed = sorted(k for k in params if k in old and old[k] != params[k])
            params = {k: v for k, v in params.items() if k not in old}  # MLflow params cannot change
            if changed:
                self._client.log_dict(self.run_id, run.recorded_config, f"config_resumed_at_step_{run.start_step}.yaml")
                log.info("mlflow: settings changed on resume (see the run's config_resumed_at_step_*.yaml): %s",
                         ", ".join(changed))  # fmt: skip
        else:
            exp = self._client.get_experiment_by_name(o.experiment)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(o.experiment)
            tags = {"stage": run.stage, **o.tags}
            self.run_id = self._client.create_run(exp_id, run_name=run.run_name, tags=tags).info.run_id
            self._client.log_dict(self.run_id, run.recorded_config, "config.yaml")
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), self._PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + self._PARAMS_PER_BATCH])

    def log(self, step: int, split: str, metrics: Mapping[str, float], when: float) -> None:
        from mlflow.entities import Metric

        ms = int(when * 1000)
        batch = [Metric(f"{split}/{k}", v, ms, step) for k, v in finite(metrics).items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def close(self, outcome: Outcome) -> None:
        self._client.set_terminated(self.run_id, status=self._STATUS[outcome])

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri}


class TrackioTracker(Tracker):
    """trackio: a run in ``project`` (local SQLite store under TRACKIO_DIR, or the Space/server of
    TRACKIO_SPACE_ID / TRACKIO_SERVER_URL); the config (with ``stage``) is the run's config."""

    name = "trackio"

    def __init__(self, run: RunInfo, resume: Mapping[str, Any] | None) -> None:
        import trackio

        o = run.options.trackio
        resumed = bool(resume and resume.get("name") and resume.get("project") == o.project)
        self._run = trackio.init(
            project=o.project,
            name=str(resume["name"]) if resumed and resume else run.run_name,
            group=o.group,
            config=run.recorded_config,
            resume="allow" if resumed else "never",
            auto_log_cpu=False,  # only the training metrics, as in metrics.jsonl
            auto_log_gpu=False,
            embed=False,
        )
        self.project = o.project

    def log(self, step: int, split: str, metrics: Mapping[str, float], when: float) -> None:
        self._run.log({f"{split}/{k}": v for k, v in finite(metrics).items()}, step=step)

    def close(self, outcome: Outcome) -> None:
        import trackio

        if outcome != "completed":  # trackio runs have no status: an alert records how the run ended
            level = trackio.AlertLevel.WARN if outcome == "preempted" else trackio.AlertLevel.ERROR
            with contextlib.suppress(Exception):  # a courtesy; finishing (flushing) is what matters
                self._run.alert(title=f"training {outcome}", text=f"run {self._run.name}: {outcome}", level=level)
        current = getattr(getattr(trackio, "context_vars", None), "current_run", None)
        if current is not None and current.get() is self._run:
            trackio.finish()  # also clears trackio's current run, so its exit hook does not finish it again
        else:
            self._run.finish()

    def state(self) -> dict[str, Any]:
        return {"name": self._run.name, "project": self.project, "id": self._run.id}


# ---- opening and closing them together ----------------------------------------------------------


def tracker_class(name: str) -> type[Tracker]:
    spec = TRACKERS[name]
    module, cls_name = spec.target.split(":")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except ImportError as e:
        raise TrackerUnavailable(f"{_missing(name, spec)} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Tracker)):
        raise TypeError(f"tracker {name!r}: {spec.target} is not a Tracker subclass")
    return cls


class Trackers:
    """The run's trackers: every logged line to each; a non-critical one that fails is switched off."""

    def __init__(self, names: Sequence[str], run: RunInfo) -> None:
        self.run = run
        run.log_dir.mkdir(parents=True, exist_ok=True)
        state = self._read_state() if run.start_step > 0 else {}
        self.open: list[Tracker] = []
        try:
            for name in names:
                spec = TRACKERS[name]
                try:
                    cls = tracker_class(name)
                    self.open.append(cls(run, state.get(name)))
                except ImportError as e:  # a package found by require_tracker_packages but broken
                    raise TrackerUnavailable(f"{_missing(name, spec)} ({e})") from None
        except BaseException:
            self.close("failed")
            raise
        self._write_state()

    def log(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        when = time.time()
        for t in list(self.open):
            try:
                t.log(step, split, metrics, when)
            except Exception as e:
                if t.critical:
                    raise
                log.warning("%s: logging failed (%s: %s); this tracker is off for the rest of the run, "
                            "metrics.jsonl keeps every line", t.name, type(e).__name__, e)  # fmt: skip
                self.open.remove(t)
                with contextlib.suppress(Exception):
                    t.close("failed")

    def close(self, outcome: Outcome) -> None:
        """Close each, all of them even when one fails. A non-critical tracker that cannot finish its run (a
        server gone at the end) is a warning: the training it recorded is done and its exports must still be
        written. A critical one's error is raised after the others closed (unless the run already failed)."""
        error: BaseException | None = None
        while self.open:
            t = self.open.pop()
            try:
                t.close(outcome)
            except Exception as e:
                log.warning("%s: closing failed (%s: %s)", t.name, type(e).__name__, e)
                if t.critical:
                    error = error or e
        if error is not None and outcome != "failed":
            raise error

    def _state_path(self) -> Path:
        return self.run.log_dir / STATE_FILE

    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self._state_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_state(self) -> None:
        state = self._read_state()
        state.update({t.name: t.state() for t in self.open if t.state()})
        tmp = self._state_path().with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self._state_path())
