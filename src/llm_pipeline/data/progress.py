"""A rich progress bar that is silent when disabled (tests, non-interactive logs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class _Bar:
    def __init__(self, progress: Progress | None, task: object) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)  # type: ignore[arg-type]


@contextmanager
def progress_bar(description: str, *, total: float | None = None, enabled: bool = True) -> Iterator[_Bar]:
    """Context manager yielding an object with ``advance(n)``; a no-op when ``enabled`` is false."""
    if not enabled:
        yield _Bar(None, None)
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))
