"""The records a pipeline run leaves, typed: ``summary.json`` (one record per stage), gate verdicts and
``promoted/<stage>.json``. The pipeline writes them through these classes and ``report``, ``gates`` and
``ckpt`` read them through the same classes, so a key cannot be renamed on one side only.

Old files still load: every field is optional (the records written before these classes have the same
keys), and keys a reader does not know are kept. A file that is not such a record at all (a list, a
stage record that is not an object) is refused with :class:`RecordError`, which names the file and
says what to do.

A promotion record vouches for one export by content: ``fingerprint`` is the sha256 of its files.
:func:`read_promotion` checks it (cheaply: the files' names, sizes and times first, the bytes only when
those changed), so a pointer left by an earlier run never vouches for an export written since.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llm_pipeline.checkpoint.fsio import write_text_synced
from llm_pipeline.hashing import folder_digest, short_hash

SUMMARY = "summary.json"
PROMOTED = "promoted"
FINISHED = ("trained", "evaluated", "promoted", "blocked")  # a stage record's states after its training ended


class RecordError(ValueError):
    """A record file that is not what the pipeline writes (the message names it and what to do)."""


class _Record(BaseModel):
    """Lenient on reading (unknown keys kept, every field optional): records outlive the code that wrote them."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="python", by_alias=True, exclude_defaults=True)


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


class RuleResult(_Record):
    """One gate rule checked: the value, whether it held, and why not."""

    metric: str
    passed: bool
    value: float | None = None
    reason: str = ""
    baseline: float | None = None  # the value a regression rule compared with (passed or not)
    baseline_of: str | None = None  # where it came from: the baseline stage's results or a metric of the stage

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="python")  # every key, None included: a table of rules reads them all


class Verdict(_Record):
    """A gate's verdict on one stage's evaluation: passed only when every rule held."""

    stage: str
    passed: bool
    results: list[RuleResult] = Field(default_factory=list, alias="rules")

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "passed": self.passed, "rules": [r.to_json() for r in self.results]}

    def to_json(self) -> dict[str, Any]:
        return self.to_dict()

    def failed(self) -> list[RuleResult]:
        return [r for r in self.results if not r.passed]


# --------------------------------------------------------------------------------------------
# Fingerprints of export folders
# --------------------------------------------------------------------------------------------


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def folder_stat(path: Path) -> str | None:
    """Names, sizes and modification times of a folder's files: cheap, and changes whenever a file is rewritten."""
    if not path.is_dir():
        return None
    files = [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in _files(path)]
    return short_hash(files) if files else None


def folder_fingerprint(path: Path) -> str | None:
    """The content of an export folder: names and sha256 of every file (a re-export of the same weights is
    the same fingerprint; one flipped byte is another)."""
    return folder_digest(path)


class FolderPrint(_Record):
    """A folder's content fingerprint and the stat signature it was computed at (to skip re-hashing)."""

    stat: str | None = None
    content: str | None = None


def cached_fingerprint(path: Path, cache: dict[str, FolderPrint]) -> str | None:
    """:func:`folder_fingerprint`, hashing the bytes only when the files changed since ``cache`` saw them."""
    stat = folder_stat(path)
    key = str(path)
    known = cache.get(key)
    if stat is None:
        cache.pop(key, None)
        return None
    if known is None or known.stat != stat:
        known = cache[key] = FolderPrint(stat=stat, content=folder_fingerprint(path))
    return known.content


# --------------------------------------------------------------------------------------------
# summary.json
# --------------------------------------------------------------------------------------------


class StageRecord(_Record):
    """What the pipeline knows about one stage: how it was trained, what it wrote, how it was judged."""

    kind: str | None = None
    status: str | None = None  # trained / evaluated / promoted / blocked / preempted / diverged...
    fingerprint: str | None = None  # resolved config + start model + data: unchanged = nothing to do
    inputs_fingerprint: str | None = None  # start weights + data by content: changed = checkpoints set aside
    config_hash: str | None = None
    start_fingerprint: str | None = None  # content of the export it started from
    final_dir: str | None = None  # the export this record describes (the promoted one, or a candidate)
    exports: dict[str, str] = Field(default_factory=dict)
    output_fingerprint: str | None = None  # content of final_dir
    eval_dir: str | None = None  # where final_dir's evaluation is (evals/<stage>_final or a candidate's)
    steps: int | None = None
    tokens_seen: int | float | None = None
    val_losses: dict[int, float | None] = Field(default_factory=dict)
    eval_metrics: dict[int, dict[str, Any]] = Field(default_factory=dict)
    skipped_steps: int | None = None
    empty_batches: int | None = None
    oom_events: int | None = None
    stats: dict[str, Any] = Field(default_factory=dict)
    wall_s: float | None = None
    nproc_per_node: int | None = None
    eval: dict[str, Any] | None = None
    gate: Verdict | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class EvalRecord(_Record):
    fingerprint: str | None = None
    results: str | None = None


class InitRecord(_Record):
    fingerprint: str | None = None
    output_fingerprint: str | None = None


class Summary(_Record):
    """``summary.json``: every step of every run on this folder."""

    run_dir: str | None = None
    data: Any = None
    init: InitRecord | None = None
    init_eval: dict[str, Any] | None = None
    evals: dict[str, EvalRecord] = Field(default_factory=dict)
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    generate: Any = None
    fingerprints: dict[str, FolderPrint] = Field(default_factory=dict)  # export folders' content, by path


def _explain(path: Path, e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "the top level"
    return f"{where}: {first['msg']}"


def parse_summary(data: Any, path: Path) -> Summary:
    """A parsed ``summary.json``; :class:`RecordError` when it is not one."""
    fix = (
        f"it was not written by llm-pipeline or is damaged: move it aside (mv {path} {path}.bad) and run the "
        "pipeline again, which rewrites it (finished stages are then trained and evaluated again)"
    )
    if not isinstance(data, dict):
        raise RecordError(f"{path}: expected a JSON object with a 'stages' object, got a {type(data).__name__}; {fix}")
    stages = data.get("stages", {})
    if not isinstance(stages, dict):
        raise RecordError(f"{path}: 'stages' is a {type(stages).__name__}, expected an object by stage name; {fix}")
    bad = [name for name, rec in stages.items() if not isinstance(rec, dict)]
    if bad:
        raise RecordError(f"{path}: the record of stage {bad[0]!r} is not an object; {fix}")
    try:
        return Summary.model_validate(data)
    except ValidationError as e:
        raise RecordError(f"{path}: {_explain(path, e)}; {fix}") from None


def load_summary(run_dir: Path, *, missing_ok: bool = True) -> Summary:
    """``run_dir/summary.json`` (an empty summary when there is none and ``missing_ok``)."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        if missing_ok:
            return Summary()
        raise FileNotFoundError(f"{path}: no summary (run the pipeline first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: unreadable ({e}); move it aside and run the pipeline again") from None
    return parse_summary(data, path)


def save_summary(run_dir: Path, summary: Summary) -> None:
    """Write ``summary.json`` whole or not at all (a reader never sees half of it)."""
    tmp = Path(run_dir) / f".{SUMMARY}.tmp"
    write_text_synced(tmp, json.dumps(summary.to_json(), indent=2, default=str) + "\n")
    tmp.replace(Path(run_dir) / SUMMARY)


# --------------------------------------------------------------------------------------------
# promoted/<stage>.json
# --------------------------------------------------------------------------------------------


class Promotion(_Record):
    """``promoted/<stage>.json``: the export a passed gate (or an ungated stage) vouches for, by content."""

    stage: str | None = None
    model_dir: str
    time: float | None = None
    gate: Verdict | None = None
    fingerprint: str | None = None  # folder_fingerprint(model_dir) when promoted; None: written before 2026-12
    stat: str | None = None  # folder_stat(model_dir) when promoted: unchanged files need no re-hashing
    start_fingerprint: str | None = None  # the export it was trained from (a previous stage's promoted one)


def promotion_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / PROMOTED / f"{stage}.json"


def write_promotion(run_dir: Path, record: Promotion) -> Path:
    path = promotion_path(run_dir, record.stage or "")
    path.parent.mkdir(parents=True, exist_ok=True)
    record.time = record.time or time.time()
    write_text_synced(path, json.dumps(record.to_json(), indent=2, default=str) + "\n")
    return path


def promotion_problem(record: Promotion, model_dir: Path) -> str | None:
    """Why ``record`` no longer vouches for ``model_dir`` (None: it does). A record without a fingerprint
    (written by an older version) is trusted as before."""
    if not model_dir.is_dir():
        return f"{model_dir} is gone"
    if record.fingerprint is None:
        return None
    if record.stat is not None and folder_stat(model_dir) == record.stat:
        return None
    if folder_fingerprint(model_dir) != record.fingerprint:
        return (
            f"{model_dir} was rewritten after its gate passed (by a retrain or another command): that export "
            "was never gated"
        )
    return None


def read_promotion_file(path: Path) -> Promotion:
    """A promotion record, unchecked; :class:`RecordError` when unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return Promotion.model_validate(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError) as e:
        raise RecordError(f"{path}: not a promotion record ({type(e).__name__}); run the pipeline again") from None


def read_promotion(run_dir: Path, stage: str) -> tuple[Promotion | None, str | None]:
    """(the record, None) when ``promoted/<stage>.json`` vouches for the export it names; (record or None,
    why not) otherwise; (None, None) when there is no record."""
    path = promotion_path(run_dir, stage)
    if not path.is_file():
        return None, None
    try:
        record = read_promotion_file(path)
    except RecordError as e:
        return None, str(e)
    model_dir = resolve_in_run(run_dir, record.model_dir)
    return record, promotion_problem(record, model_dir)


def stale_promotion(path: Path, run_dir: Path) -> str | None:
    """Why the promotion record at ``path`` vouches for an export that has been rewritten since its gate (None:
    it holds, is unreadable, or names a folder that is gone: those are the caller's to judge)."""
    try:
        record = read_promotion_file(path)
    except RecordError:
        return None
    model_dir = resolve_in_run(run_dir, record.model_dir)
    return promotion_problem(record, model_dir) if model_dir.is_dir() else None


def resolve_in_run(run_dir: Path, recorded: str | os.PathLike[str]) -> Path:
    """A path recorded by a run, read as recorded, else beside the run folder's own (a moved run)."""
    p = Path(recorded)
    if p.exists():
        return p
    moved = Path(run_dir) / "checkpoints" / p.name
    return moved if moved.exists() else p
