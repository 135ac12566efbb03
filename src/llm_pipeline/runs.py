"""Finding run folders (``runs/<name>/``) when a command is not told which one to use.

A run folder is what ``llm-pipeline run`` writes: ``pipeline.resolved.yaml``, ``summary.json``,
``checkpoints/``, ``logs/``, ``evals/``. Commands that read a run after the fact (gates, report,
checkpoint listing) default to the newest one and say so, rather than looking in the wrong place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

RUNS_DIR = Path("runs")
_MARKERS = ("pipeline.resolved.yaml", "summary.json", "checkpoints", "evals", "logs")


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / m).exists() for m in _MARKERS)


def _last_change(run: Path) -> float:
    """When the run last wrote something we care about (the folder's own mtime misses nested writes)."""
    times = [run.stat().st_mtime]
    for m in _MARKERS:
        with contextlib.suppress(OSError):
            times.append((run / m).stat().st_mtime)
    return max(times)


def find_runs(base: str | os.PathLike[str] = RUNS_DIR) -> list[Path]:
    """Run folders directly under ``base``, newest first."""
    root = Path(base)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if is_run_dir(p)]
    return sorted(runs, key=_last_change, reverse=True)


def newest_run(base: str | os.PathLike[str] = RUNS_DIR, *, where: Callable[[Path], bool] | None = None) -> Path | None:
    """The most recently active run under ``base`` (that satisfies ``where``), or None."""
    return next((r for r in find_runs(base) if where is None or where(r)), None)


def default_run(base: str | os.PathLike[str] = RUNS_DIR) -> Path | None:
    """``runs/demo`` when present (what ``make demo`` writes), else the newest run."""
    demo = Path(base) / "demo"
    return demo if is_run_dir(demo) else newest_run(base)
