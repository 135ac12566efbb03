"""Wall-clock budget and progress reporting shared by every eval.

Evals call :meth:`Budget.check` between batches, so a run over budget stops within one batch and
is reported as *timed out* (with how far it got), never as a score of zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class EvalTimeout(Exception):
    """An eval ran past its wall-clock budget."""

    def __init__(self, timeout_s: float, completed: int, total: int | None) -> None:
        super().__init__(f"timed out after {timeout_s:g}s ({completed}/{total if total is not None else '?'} done)")
        self.timeout_s = timeout_s
        self.completed = completed
        self.total = total


class Budget:
    """A deadline plus a progress counter; ``on_progress(completed, total, phase)`` drives a progress bar."""

    def __init__(
        self,
        timeout_s: float | None = None,
        *,
        on_progress: Callable[[int, int | None, str], None] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s if timeout_s is not None else None
        self.on_progress = on_progress
        self.completed = 0
        self.total: int | None = None
        self.phase = ""

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def child(self) -> Budget:
        """A budget with this one's deadline and a progress counter of its own (a task run inside a task)."""
        out = Budget(on_progress=None)
        out.timeout_s, out.start, out.deadline = self.timeout_s, self.start, self.deadline
        return out

    def set_total(self, total: int, phase: str = "") -> None:
        """Start counting a (new) phase of ``total`` units from zero."""
        self.total, self.completed, self.phase = total, 0, phase
        self._report()

    def advance(self, n: int = 1) -> None:
        self.completed += n
        self._report()

    def check(self) -> None:
        """Raise :class:`EvalTimeout` once the deadline has passed."""
        if self.expired:
            raise EvalTimeout(self.timeout_s or 0.0, self.completed, self.total)

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.completed, self.total, self.phase)
