"""One writer per output folder: a lock file naming the process that owns the folder.

Two runs writing checkpoints into the same folder would commit over each other and prune each
other's checkpoints. :class:`FolderLock` writes ``<folder>/.llm_pipeline.lock`` holding the owner's
pid, host, process start time and command. A second run on the folder stops with a message naming
that pid. A lock left behind by a process that no longer exists on this host (``kill -9``, a crash, a
reboot) is stale: it is taken over with a warning, so a crashed run can always be resumed. A lock
from another host cannot be checked from here; the message says which host and how to clear it.

A lock also covers every folder below its own: ``llm-pipeline run`` locks its run folder, so a
second run, a standalone stage (``--output_dir runs/demo/checkpoints/sft``) or a ``ckpt`` verb that
writes anywhere inside it is refused while the run lives. Processes the owner starts itself (torchrun
workers) inherit its token in ``LLM_PIPELINE_LOCK_TOKEN`` and may take locks below it.

Usable as a context manager by any command that writes into a folder::

    with FolderLock(out_dir, purpose="export"):
        ...
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = ".llm_pipeline.lock"
TOKEN_ENV = "LLM_PIPELINE_LOCK_TOKEN"  # a lock holder's token, inherited by the processes it starts


class FolderLocked(RuntimeError):
    """The folder is in use by another live process; the message names it and the folder."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: enough to tell a live owner from a dead one, and to tell the user who it is."""

    pid: int
    host: str
    start_time: int | None  # process start, in clock ticks since boot (Linux); tells pid reuse apart
    boot_id: str | None
    created: float
    command: str
    purpose: str
    token: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))
        return f"pid {self.pid} on {self.host} since {since} ({self.purpose}: {self.command})"


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name, or None (no such process / not Linux)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _alive(owner: LockOwner) -> bool:
    """Whether ``owner`` (on this host) still runs: same pid, same start time, not a zombie, same boot."""
    if owner.boot_id and _boot_id() and owner.boot_id != _boot_id():
        return False
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    fields = _proc_stat(owner.pid)
    if fields is None:
        return not Path("/proc/self/stat").exists()  # no procfs: trust kill(0)
    if fields[0] in ("Z", "X"):  # killed, not yet reaped
        return False
    return owner.start_time is None or int(fields[19]) == owner.start_time


def read_lock(folder: str | os.PathLike[str]) -> LockOwner | None:
    """The current owner recorded in ``folder``'s lock file (None: unlocked or unreadable)."""
    try:
        data = json.loads((Path(folder) / LOCK_FILE).read_text(encoding="utf-8"))
        return LockOwner(**{k: data.get(k) for k in LockOwner.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


def _is_ours(owner: LockOwner) -> bool:
    """Held by this process, or by the process that started us and handed us its token (torchrun workers)."""
    if owner.host != socket.gethostname():
        return False
    if owner.token and owner.token in os.environ.get(TOKEN_ENV, "").split(","):
        return True
    return owner.pid == os.getpid() and owner.start_time == _start_time(owner.pid)


def _live(owner: LockOwner | None) -> LockOwner | None:
    if owner is None:
        return None
    return owner if owner.host != socket.gethostname() or _alive(owner) else None


def enclosing_owner(folder: str | os.PathLike[str]) -> tuple[Path, LockOwner] | None:
    """A live lock on a folder above ``folder`` (e.g. a pipeline run holding its run folder) that is not held by
    this process or the process that started it: (locked folder, owner), or None."""
    for parent in Path(os.path.abspath(folder)).parents:
        owner = _live(read_lock(parent))
        if owner is not None and not _is_ours(owner):
            return parent, owner
    return None


def live_owner(folder: str | os.PathLike[str]) -> LockOwner | None:
    """Who holds ``folder`` right now: the lock's owner while it runs (or runs on another host, which
    cannot be checked from here, so it counts as running), or the owner of a live lock on a folder above
    it (a pipeline run owns everything in its run folder); None when the folder is free or its lock stale."""
    owner = _live(read_lock(folder))
    if owner is not None:
        return owner
    above = enclosing_owner(folder)
    return above[1] if above is not None else None


@contextlib.contextmanager
def _guard(folder: Path):
    """Serialise lock takeovers on this host (flock on the folder itself; best effort elsewhere)."""
    fd = None
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):
        if fd is not None:
            os.close(fd)
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the flock


class FolderLock:
    """Exclusive ownership of ``folder`` by this process (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], *, purpose: str = "training run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.purpose = purpose
        self.owner: LockOwner | None = None

    @property
    def held(self) -> bool:
        return self.owner is not None

    def _me(self) -> LockOwner:
        pid = os.getpid()
        return LockOwner(
            pid=pid,
            host=socket.gethostname(),
            start_time=_start_time(pid),
            boot_id=_boot_id(),
            created=time.time(),
            command=" ".join(sys.argv)[:300],
            purpose=self.purpose,
            token=uuid.uuid4().hex,
        )

    def acquire(self) -> FolderLock:
        """Take the folder or raise :class:`FolderLocked`; a stale lock is taken over with a warning."""
        if self.owner is not None:
            return self
        above = enclosing_owner(self.folder)
        if above is not None:
            where, other = above
            raise FolderLocked(
                f"{self.folder} is inside {where}, which is in use by {other.describe()}; two runs must not write "
                f"into one folder. Wait for it to finish, stop it (kill {other.pid}), or use a folder outside {where}"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        me = self._me()
        text = json.dumps(asdict(me), indent=2) + "\n"
        with _guard(self.folder):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over(me, text)
            else:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
        self.owner = me
        return self

    def _take_over(self, me: LockOwner, text: str) -> None:
        other = read_lock(self.folder)
        if other is not None:
            same_host = other.host == me.host
            if same_host and other.pid == me.pid and other.start_time == me.start_time:
                log.debug("%s: lock already held by this process; taking it over", self.folder)
            elif not same_host:
                raise FolderLocked(
                    f"{self.folder} is in use by {other.describe()}; two runs must not write into one folder. "
                    f"If that run is no longer running (its node is gone), delete {self.path} and retry"
                )
            elif _alive(other):
                raise FolderLocked(
                    f"{self.folder} is in use by {other.describe()}; two runs must not write into one folder. "
                    f"Wait for it to finish, stop it (kill {other.pid}), or use another output folder"
                )
            else:
                log.warning(
                    "%s: taking over a stale lock of %s, which is no longer running", self.folder, other.describe()
                )
        else:
            log.warning("%s: replacing an unreadable lock file", self.path)
        tmp = self.folder / f"{LOCK_FILE}.{me.pid}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def release(self) -> None:
        """Give the folder back (only if the lock file is still ours; safe to call twice)."""
        owner, self.owner = self.owner, None
        if owner is None:
            return
        current = read_lock(self.folder)
        if current is not None and current.token == owner.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def move_folder(self, dest: str | os.PathLike[str]) -> Path:
        """Rename the held folder (no other process can be inside it) and give the lock up: the lock file that
        moved with it is removed there."""
        if self.owner is None:
            raise RuntimeError(f"{self.folder}: moved without holding its lock")
        dest = Path(dest)
        self.folder.rename(dest)
        current = read_lock(dest)
        if current is not None and current.token == self.owner.token:
            with contextlib.suppress(FileNotFoundError):
                (dest / LOCK_FILE).unlink()
        self.owner = None
        return dest

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
