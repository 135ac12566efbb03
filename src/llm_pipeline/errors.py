"""Turning operating-system failures into one actionable line (disk full, read-only, permission).

The CLI's last line of defence and the checkpoint writer share this, so the same fault reads the same
wherever it happens: what failed, where, and what to do about it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

# errno -> what happened and what the user can do about it.
_FIXES = {
    errno.ENOSPC: "no space left on the device: free some space or point the output somewhere larger",
    errno.EDQUOT: "disk quota exceeded: free some space or point the output somewhere larger",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: check the folder's owner and mode, or choose a folder you can write",
    errno.EPERM: "operation not permitted: check the folder's owner and mode, or choose a folder you can write",
    errno.EIO: "input/output error: the disk or network file system is failing",
    errno.ENOTDIR: "part of this path is a file, not a folder: choose another path",
    errno.EEXIST: "already exists and is in the way (a file where a folder is expected?): choose another path",
}


class ExplainedOSError(OSError):
    """An ``OSError`` whose message already says what failed, where and what to do (printed as is)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


def explain_os_error(e: OSError, action: str | None = None) -> str:
    """``"<action>: <path>: <reason and fix>"`` on one line."""
    if isinstance(e, ExplainedOSError):
        return f"{action}: {e}" if action else str(e)
    reason = _FIXES.get(e.errno) if e.errno is not None else None
    if reason is None:
        reason = e.strerror or str(e) or type(e).__name__
    where = None if e.filename is None else str(e.filename)
    if where is not None and e.filename2 is not None:
        where += f" -> {e.filename2}"
    return ": ".join(p for p in (action, where, reason) if p).replace("\n", " ")


def iter_causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its cause/context chain, and the per-rank failures a DCP ``CheckpointException`` wraps."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            for v in failures.values():  # (exception, traceback summary) pairs, or bare exceptions
                inner = v[0] if isinstance(v, tuple) and v else v
                if isinstance(inner, BaseException):
                    todo.append(inner)
        todo.extend([e.__cause__, e.__context__])


def find_os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` (with an errno) behind ``exc``, if there is one."""
    return next((e for e in iter_causes(exc) if isinstance(e, OSError) and e.errno is not None), None)
