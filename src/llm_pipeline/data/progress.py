"""A rich progress bar that is silent when disabled (tests, non-interactive logs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)


class _Bar:
    def __init__(self, progress: Progress | None, task: object) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)  # type: ignore[arg-type]


@contextmanager
def progress_bar(
    description: str, *, total: float | None = None, enabled: bool = True, unit: Literal["items", "bytes"] = "items"
) -> Iterator[_Bar]:
    """Context manager yielding an object with ``advance(n)``; a no-op when ``enabled`` is false.

    ``unit="bytes"`` shows sizes and throughput (hashing, archiving) and draws on stderr, so a command's
    own output on stdout (a table, JSON) stays clean.
    """
    console = Console(stderr=unit == "bytes")
    if not enabled or not console.is_terminal:  # in a log file a live bar is only blank lines
        yield _Bar(None, None)
        return
    count: list[ProgressColumn] = (
        [DownloadColumn(binary_units=True), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    )
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), *count, TimeElapsedColumn()]
    with Progress(*columns, transient=True, console=console) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))
