"""Checkpoint management for operators: list, verify, disk usage and cleanup of a checkpoints root.

A root (``checkpoints/``, or a run's ``runs/<name>/checkpoints/``) is laid out by the stage runner:

    <stage>/checkpoint-<step>/   committed DCP checkpoints (COMMITTED + checksums.sha256); the running
                                 stage holds the folder's lock (``.llm_pipeline.lock``)
    <stage>_final/               the stage's HF export (LoRA: also <stage>_final_adapter/ ...)
    init_final/                  the first stage's starting model, when the pipeline evaluated it

and promotion records sit beside it in ``<root>/../promoted/<stage>.json`` (``model_dir`` names the
promoted model). Cleanup keeps the newest N valid checkpoints of a stage and never deletes a promoted
one, a final one (the step training ended on, the one its export was written from) or any checkpoint of
a stage in use; it takes the stage's lock while it works, so no run can start under it, and deletes the
way training prunes (:func:`~llm_pipeline.checkpoint.dcp.discard_checkpoint`). Archives: ``archive.py``.

Exports are checked like checkpoints: their ``checksums.sha256`` (written with every export) is read by the
quick check and hashed by :func:`verify`. Which root a command works on, when it is not told, is decided
once here (:func:`find_root`): ``./checkpoints``, else the newest run under ``runs/`` that has checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from llm_pipeline.checkpoint import checksums
from llm_pipeline.checkpoint.checksums import ChecksumMismatch
from llm_pipeline.checkpoint.dcp import (
    COMMIT_MARKER,
    OLD_PREFIX,
    PRUNED_PREFIX,
    TMP_PREFIX,
    clean_leftovers,
    discard_checkpoint,
)
from llm_pipeline.checkpoint.fsio import human_bytes
from llm_pipeline.checkpoint.hf import export_problems, read_export_manifest
from llm_pipeline.checkpoint.lock import FolderLock, LockOwner, live_owner
from llm_pipeline.data.progress import progress_bar
from llm_pipeline.records import stale_promotion

if TYPE_CHECKING:
    from llm_pipeline.checkpoint.archive import ArchiveInfo

log = logging.getLogger(__name__)

_STEP = re.compile(r"^checkpoint-(\d+)$")
_FINAL = re.compile(r"^(?P<stage>.+?)_final(?:_.+)?$")
_LEFTOVER = (TMP_PREFIX, PRUNED_PREFIX, OLD_PREFIX)
DEFAULT_ROOT = "checkpoints"


@dataclass
class Entry:
    """One checkpoint or export folder under the root, with what an operator needs to decide about it."""

    stage: str
    path: Path
    kind: str  # "checkpoint", "export", or "leftover" (an interrupted save; cleared by the next run)
    step: int | None = None
    size: int = 0
    committed: bool = True
    problems: list[str] = field(default_factory=list)
    verified: bool = False  # every file hashed against the manifest
    promoted: str | None = None  # the promotion record naming it
    final: bool = False
    in_use: LockOwner | None = None
    checksummed: bool = True  # False: an export without checksums.sha256 (older, or not written by us)
    link: str | None = None  # where a checkpoint that is a symbolic link points

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        if self.kind == "leftover":
            return "leftover"
        if not self.committed:
            return "uncommitted"
        if self.problems:
            return "DAMAGED"
        if self.kind == "export":
            return "verified" if self.verified else "ok" if self.checksummed else "no checksums"
        return "verified" if self.verified else "committed"

    @property
    def protected(self) -> str | None:
        """Why cleanup must leave it alone (None: it may go)."""
        if self.in_use is not None:
            return f"in use by {self.in_use.describe()}"
        if self.promoted:
            return f"promoted ({self.promoted})"
        if self.final:
            return "final (training ended here)"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "path": str(self.path), "kind": self.kind, "step": self.step, "size": self.size,
            "status": self.status, "problems": self.problems, "promoted": self.promoted, "final": self.final,
            "in_use": self.in_use.describe() if self.in_use else None, "link": self.link,
        }  # fmt: skip


def folder_size(path: Path) -> int:
    """Apparent size of every file below ``path`` (symbolic links not followed)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # removed meanwhile (a run pruning)
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


# --------------------------------------------------------------------------------------------
# Finding what is under a root
# --------------------------------------------------------------------------------------------


def normalise_root(root: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``(root, stage)``: a stage folder given as the root means its parent, filtered to that stage."""
    p = Path(root)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such checkpoints folder (set --root or CKPT_ROOT)")
    if any(_STEP.match(c.name) and c.is_dir() for c in p.iterdir()):
        return p.parent, p.name
    return p, None


def stage_dirs(root: Path) -> dict[str, Path]:
    """Training output folders: they hold checkpoints, a lock or a saved config."""
    out = {}
    for p in sorted(root.iterdir()):
        if not p.is_dir() or _FINAL.match(p.name) or p.name.startswith("."):
            continue
        if (p / "config.json").is_file():  # an HF model folder (e.g. `init -o checkpoints/init`)
            continue
        names = [c.name for c in p.iterdir()]
        if any(_STEP.match(n) or n.startswith(_LEFTOVER) for n in names) or {".llm_pipeline.lock", "config.yaml"} & {
            *names
        }:
            out[p.name] = p
    return out


def _export_stage(p: Path) -> str | None:
    """The stage an export folder belongs to (``sft_final`` -> sft), or None when ``p`` is no model export."""
    m = _FINAL.match(p.name)
    is_model = any((p / f).is_file() for f in ("config.json", "adapter_config.json", "llm_pipeline.json"))
    if p.is_dir() and is_model and not (p / COMMIT_MARKER).exists():
        return m.group("stage") if m else p.name
    return None


def promotions(root: Path) -> dict[Path, str]:
    """Resolved model paths named by ``<root>/../promoted/*.json`` -> the record's name.

    A relative ``model_dir`` is read against the working directory, the run folder and its parent (the
    pipeline records paths as it was given them); every reading is protected, since protecting too much
    costs disk space while protecting too little costs a model.
    """
    folder = root.parent / "promoted"
    out: dict[Path, str] = {}
    if not folder.is_dir():
        return out
    for rec in sorted(folder.glob("*.json")):
        try:
            data = json.loads(rec.read_text(encoding="utf-8"))
            model = Path(str(data["model_dir"]))
            if (stale := stale_promotion(rec, root.parent)) is not None:  # rewritten since its gate passed
                log.warning("%s no longer holds: %s", rec, stale)
                continue
        except (OSError, ValueError, KeyError, TypeError) as e:
            # An unreadable record must not leave its model unprotected: protect the stage's export.
            log.warning("%s: unreadable promotion record (%s); protecting %s_final", rec, e, rec.stem)
            model = root / f"{rec.stem}_final"
        bases = [Path()] if model.is_absolute() else [Path(), root.parent, root.parent.parent]
        for base in bases:
            out[(base / model).resolve()] = f"promoted/{rec.name}"
        out[(root / model.name).resolve()] = f"promoted/{rec.name}"  # the same folder, moved with its run
    return out


def _final_steps(root: Path, stage: str) -> set[int]:
    """Steps a stage's training ended on: summary.json's record, else none known."""
    try:
        data = json.loads((root.parent / "summary.json").read_text(encoding="utf-8"))
        steps = data["stages"][stage]["steps"]
        return {int(steps)} if isinstance(steps, int) else set()
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _planned_max_steps(ckpt: Path) -> int | None:
    """``training.max_steps`` of the run that wrote ``ckpt`` (its saved config)."""
    try:
        data = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8")) or {}
        return int(data["training"]["max_steps"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None


def quick_check(ckpt: Path) -> list[str]:
    """Problems found without hashing: the commit marker, a readable manifest, every listed file present."""
    if not (ckpt / COMMIT_MARKER).is_file():
        return [f"no {COMMIT_MARKER} marker: a save that never finished"]
    try:
        sums = checksums.read_manifest(ckpt)
    except ChecksumMismatch as e:
        return [str(e)]
    if sums is None:
        return [f"no {checksums.MANIFEST} (saved by an older version): integrity cannot be checked"]
    return [f"{name}: missing" for name in sorted(sums) if not (ckpt / name).is_file()]


def _export_entry(p: Path, stage: str, promoted: dict[Path, str]) -> Entry:
    """An export folder, quickly checked: a model or adapter config, and every file its manifest lists."""
    sdir = p.parent / stage
    owner = live_owner(sdir) if sdir.is_dir() else None
    e = Entry(stage, p, "export", final=True, in_use=owner, promoted=promoted.get(p.resolve()))
    if not any((p / f).is_file() for f in ("config.json", "adapter_config.json")):
        e.problems = ["no config.json or adapter_config.json"]
    quick = export_problems(p, full=False)
    e.checksummed = quick is not None
    e.problems += quick or []
    return e


def scan(root: str | os.PathLike[str], *, stage: str | None = None, sizes: bool = True) -> list[Entry]:
    """Every checkpoint, export and leftover under ``root`` (optionally one stage), checked quickly."""
    root, only = normalise_root(root)
    only = stage or only
    promoted = promotions(root)
    entries: list[Entry] = []
    for name, sdir in stage_dirs(root).items():
        if only and name != only:
            continue
        owner = live_owner(sdir)
        final_steps = _final_steps(root, name)
        for p in sorted(sdir.iterdir()):
            if not p.is_dir():
                continue
            m = _STEP.match(p.name)
            if m:
                step = int(m.group(1))
                e = Entry(name, p, "checkpoint", step=step, committed=(p / COMMIT_MARKER).is_file(), in_use=owner)
                e.problems = quick_check(p) if e.committed else []
                e.final = e.committed and (step in final_steps or step == _planned_max_steps(p))
                e.link = os.readlink(p) if p.is_symlink() else None
            elif p.name.startswith(_LEFTOVER):
                e = Entry(name, p, "leftover", committed=False, in_use=owner)
            else:
                continue
            e.promoted = promoted.get(p.resolve())
            entries.append(e)
    for p in sorted(root.iterdir()):
        exported = _export_stage(p)
        if exported is None or (only and exported != only):
            continue
        entries.append(_export_entry(p, exported, promoted))
    if only and not entries and only not in stage_dirs(root):
        known = sorted({*stage_dirs(root), *(s for p in root.iterdir() if (s := _export_stage(p)))})
        raise FileNotFoundError(f"{root}: nothing of stage {only!r}; stages here: {', '.join(known) or 'none'}")
    if sizes:
        for e in entries:
            e.size = folder_size(e.path)
    return sorted(entries, key=lambda e: (e.stage, e.kind != "checkpoint", e.step or 0, e.name))


# --------------------------------------------------------------------------------------------
# Verifying
# --------------------------------------------------------------------------------------------


def verify(entries: list[Entry], *, progress: bool = True, workers: int | None = None) -> list[Entry]:
    """Hash every committed checkpoint's and every export's files against its manifest; problems land in
    ``entry.problems`` (an export without a manifest stays ``checksummed=False``: nothing to check it against).

    Files are hashed on a few threads (hashlib releases the GIL), with one progress bar over all bytes.
    """
    jobs: list[tuple[Entry, str, str, int]] = []
    for e in entries:
        if e.kind == "leftover" or not e.committed or e.problems or not e.checksummed:
            continue
        try:
            sums = (checksums.read_manifest(e.path) if e.kind == "checkpoint" else read_export_manifest(e.path)) or {}
        except ChecksumMismatch as err:  # changed since the quick check
            e.problems.append(str(err))
            continue
        for name, digest in sorted(sums.items()):
            try:
                jobs.append((e, name, digest, (e.path / name).stat().st_size))
            except OSError as err:  # removed since the quick check (a run pruning it)
                e.problems.append(f"{name}: {err.strerror or err}")
    total = sum(j[3] for j in jobs)
    workers = workers or min(4, os.cpu_count() or 1)

    def check(job: tuple[Entry, str, str, int]) -> tuple[Entry, list[str]]:
        e, name, digest, _ = job
        return e, checksums.verify(e.path, {name: digest})

    with (
        progress_bar("verify", total=total, enabled=progress and total > 0, unit="bytes") as bar,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        for job, (e, problems) in zip(jobs, pool.map(check, jobs), strict=True):
            e.problems += problems
            bar.advance(job[3])
    for e in entries:
        if e.kind != "leftover" and e.committed and e.checksummed and not e.problems:
            e.verified = True
    return entries


def inventory(
    root: str | os.PathLike[str], *, stage: str | None = None, hashed: bool = False, progress: bool = True
) -> list[Entry]:
    """``ckpt list``: every entry under ``root`` quickly checked, or (``hashed``) verified file by file."""
    entries = scan(root, stage=stage)
    return verify(entries, progress=progress) if hashed else entries


@dataclass
class VerifyReport:
    """``ckpt verify`` of a root, one checkpoint, one export or an archive: what was hashed, what is damaged."""

    entries: list[Entry]
    archive: ArchiveInfo | None = None  # an archive was checked instead (damage raises ArchiveError)

    @property
    def damaged(self) -> list[Entry]:
        return [e for e in self.entries if e.problems or (e.kind == "checkpoint" and not e.committed)]

    @property
    def unverifiable(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == "export" and not e.checksummed and not e.problems]

    def count(self, kind: str) -> tuple[int, int]:
        """(verified, checked) of ``kind`` ("checkpoint" or "export")."""
        checked = [e for e in self.entries if e.kind == kind and e.committed and (e.checksummed or e.problems)]
        return sum(e.verified for e in checked), len(checked)

    @property
    def hashed_bytes(self) -> int:
        return sum(e.size for e in self.entries if e.verified)


def verify_target(target: str | os.PathLike[str], *, progress: bool = True) -> VerifyReport:
    """Hash a checkpoints root, one ``checkpoint-<step>`` folder, one export folder or an archive (every member,
    without unpacking: :func:`~llm_pipeline.checkpoint.archive.verify_archive`) against its manifests."""
    target = Path(target)
    if target.is_file():
        from llm_pipeline.checkpoint.archive import verify_archive

        return VerifyReport([], archive=verify_archive(target, progress=progress))
    if not target.is_dir():
        raise FileNotFoundError(f"{target}: no such checkpoint, export, checkpoints folder or archive")
    if (target / COMMIT_MARKER).exists() or _STEP.match(target.name):
        entries = [e for e in scan(target.parent.parent, stage=target.parent.name) if e.path == target]
    elif (stage := _export_stage(target)) is not None:
        entries = [_export_entry(target, stage, promotions(target.parent))]
        entries[0].size = folder_size(target)
    else:
        entries = [e for e in scan(target) if e.kind != "leftover"]
    return VerifyReport(verify(entries, progress=progress))


def find_root(given: str | os.PathLike[str] | None, *, stage: str | None = None) -> tuple[Path | None, str | None]:
    """The checkpoints root a command works on, and a note saying how it was chosen (None: it was given).

    ``given`` (``--root``/``$CKPT_ROOT``) wins; else ``./checkpoints``; else the newest run under ``runs/``
    with checkpoints (of ``stage``, when one is named). ``(None, note)`` when there is none at all: a fresh
    clone, where listing shows an empty list rather than an error.
    """
    from llm_pipeline.runs import find_runs

    if given:
        return Path(given), None
    if Path(DEFAULT_ROOT).is_dir():
        return Path(DEFAULT_ROOT), None
    runs = [r / "checkpoints" for r in find_runs() if (r / "checkpoints").is_dir()]
    if stage is not None:
        runs = [r for r in runs if (r / stage).is_dir()]
    if runs:
        return runs[0], f"note: no ./{DEFAULT_ROOT}; using {runs[0]} (the newest run; --root to choose)"
    which = f" with checkpoints of stage {stage!r}" if stage else " with checkpoints"
    return None, f"no ./{DEFAULT_ROOT} and no run under runs/{which} (pass --root DIR or set CKPT_ROOT)"


# --------------------------------------------------------------------------------------------
# Disk usage
# --------------------------------------------------------------------------------------------


def disk_usage(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Bytes per stage (checkpoints, exports, leftovers, other files in its folder), total and free space."""
    root, _ = normalise_root(root)
    stages: dict[str, dict[str, int]] = {}

    def bucket(stage: str) -> dict[str, int]:
        return stages.setdefault(stage, {"checkpoints": 0, "exports": 0, "leftovers": 0, "other": 0, "total": 0})

    for e in scan(root):
        bucket(e.stage)[{"checkpoint": "checkpoints", "export": "exports", "leftover": "leftovers"}[e.kind]] += e.size
    for name, sdir in stage_dirs(root).items():
        b = bucket(name)
        b["other"] = max(0, folder_size(sdir) - b["checkpoints"] - b["leftovers"])  # logs, data reports, caches
    for b in stages.values():
        b["total"] = sum(v for k, v in b.items() if k != "total")
    total = folder_size(root)
    usage = shutil.disk_usage(root)
    return {
        "root": str(root),
        "stages": dict(sorted(stages.items())),
        "unaccounted": max(0, total - sum(b["total"] for b in stages.values())),
        "total": total,
        "free": usage.free,
        "disk_total": usage.total,
    }


# --------------------------------------------------------------------------------------------
# Cleanup
# --------------------------------------------------------------------------------------------


@dataclass
class CleanupPlan:
    """What ``cleanup STAGE N`` keeps, deletes and must leave alone (and why)."""

    stage: str
    keep_last: int
    keep: list[Entry] = field(default_factory=list)
    delete: list[Entry] = field(default_factory=list)
    protected: list[tuple[Entry, str]] = field(default_factory=list)
    left_alone: list[tuple[Entry, str]] = field(default_factory=list)  # damaged / uncommitted: not ours to judge

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.delete)


def plan_cleanup(entries: list[Entry], stage: str, keep_last: int) -> CleanupPlan:
    """Pure: keep the newest ``keep_last`` valid checkpoints; delete older ones unless protected.

    Damaged or uncommitted checkpoints never count towards the N kept (so N usable ones remain) and are
    never deleted either: they may be all that is left of a step, and the user decides about them.
    """
    if keep_last < 0:
        raise ValueError(f"keep {keep_last}: the number of checkpoints to keep must be 0 or more")
    plan = CleanupPlan(stage, keep_last)
    ckpts = sorted((e for e in entries if e.stage == stage and e.kind == "checkpoint"), key=lambda e: e.step or 0)
    valid = [e for e in ckpts if e.committed and not e.problems]
    newest = {id(e) for e in valid[len(valid) - keep_last :]} if keep_last else set()
    for e in reversed(ckpts):
        if not e.committed or e.problems:
            plan.left_alone.append((e, "uncommitted" if not e.committed else "damaged: " + "; ".join(e.problems[:2])))
        elif id(e) in newest:
            plan.keep.append(e)
        elif e.protected:
            plan.protected.append((e, e.protected))
        elif e.link is not None:  # what it points to may be anywhere: never deleted through a link
            why = f"a symbolic link to {e.link}: cleanup deletes only real folders; remove it and its target yourself"
            plan.left_alone.append((e, why))
        else:
            plan.delete.append(e)
    return plan


def cleanup(
    root: str | os.PathLike[str],
    stage: str,
    keep_last: int,
    *,
    dry_run: bool = False,
    verify_kept: bool = True,
    progress: bool = True,
) -> CleanupPlan:
    """Delete all but the newest ``keep_last`` valid checkpoints of ``stage`` (see :func:`plan_cleanup`).

    Holds the stage folder's lock throughout (a running stage makes this fail with its pid, and no run
    can start meanwhile); interrupted saves are cleared as a run's start would. ``verify_kept`` hashes
    the checkpoints that would be kept first, so a damaged one is not mistaken for a good copy.
    """
    root_path, _ = normalise_root(root)
    sdir = root_path / stage
    if stage not in stage_dirs(root_path):
        known = ", ".join(stage_dirs(root_path)) or "none"
        raise FileNotFoundError(f"{sdir}: no checkpoints of stage {stage!r} (stages under {root_path}: {known})")
    owner = live_owner(sdir)
    if owner is not None:
        raise RuntimeError(f"{sdir} is in use by {owner.describe()}: cleanup must wait until that stage stops")
    if dry_run:
        return _plan(root_path, stage, keep_last, verify_kept, progress)
    with FolderLock(sdir, purpose="checkpoint cleanup"):
        clean_leftovers(sdir)
        plan = _plan(root_path, stage, keep_last, verify_kept, progress)
        for e in plan.delete:
            discard_checkpoint(e.path)
            log.info("removed %s (%s)", e.path, human_bytes(e.size))
    return plan


def _plan(root: Path, stage: str, keep_last: int, verify_kept: bool, progress: bool) -> CleanupPlan:
    entries = [e for e in scan(root, stage=stage) if e.kind != "leftover"]
    for e in entries:
        e.in_use = None  # checked by the caller, who now holds the folder
    plan = plan_cleanup(entries, stage, keep_last)
    while verify_kept and any(not e.verified for e in plan.keep):
        verify([e for e in plan.keep if not e.verified], progress=progress)
        plan = plan_cleanup(entries, stage, keep_last)  # a damaged one is replaced by the next older one
    return plan
