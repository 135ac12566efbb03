"""Durable file writes shared by every checkpoint format: data reaches the disk before a commit counts.

Also the two things every writer says about space: how many bytes (:func:`human_bytes`, the one byte
formatter of the package) and whether they fit (:func:`check_free_space`, before the first byte is written).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from llm_pipeline.errors import ExplainedOSError


def human_bytes(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 GiB``: binary units, one decimal (the package's only byte formatter)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest parent that exists: where a folder about to be created will live."""
    base = Path(path).absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    return base


def check_free_space(folder: Path, needed: int, what: str, fix: str) -> None:
    """Refuse before writing when ``folder``'s disk has less than ``needed`` bytes free.

    One line (an ``ENOSPC`` :class:`ExplainedOSError`) naming the folder, ``what`` was to be written, the
    sizes, and ``fix``; ``folder`` need not exist yet (its nearest existing parent's disk is asked).
    """
    free = shutil.disk_usage(existing_ancestor(folder)).free
    if free < needed:
        raise ExplainedOSError(
            errno.ENOSPC,
            f"not enough free space in {folder} for {what}: it needs about {human_bytes(needed)}, "
            f"{human_bytes(free)} is free. {fix}",
        )


def fsync_path(path: Path) -> None:
    """Flush a file or directory entry to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_synced(path: Path, text: str) -> None:
    """Write ``text`` and fsync it before returning."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_synced(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file atomically: ``write`` fills a temp file beside ``path``, which is fsynced and renamed.

    Readers see the old file or the complete new one, never a torn write (caches, small records).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path
