"""Run untrusted (model-written) Python programs, each in its own isolated, limited process.

Layers, each reported in :meth:`Sandbox.isolation` so results say what was really enforced:

- a separate interpreter per program (``-I -S``: no site-packages, no ``PYTHON*`` variables), started
  through ``_sandbox_launch.py`` so no evaluator code is ever in that process;
- wall-clock timeout (kill of the whole process group and of every process of the sandbox uid),
  plus ``RLIMIT_CPU``, ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE``, ``RLIMIT_NPROC`` (fork bombs), no core dumps;
- a fresh scratch directory as cwd/HOME/TMPDIR, a minimal environment;
- no network: a new network namespace (root, or unprivileged user namespaces), and Landlock's TCP rules;
- filesystem: Landlock (Linux >= 5.13) allows writes and deletions only inside the scratch directory;
- when the evaluator runs as root, each worker slot drops to its own unprivileged uid, because Linux
  exempts uid 0 from ``RLIMIT_NPROC`` and file permissions.

Threads (not processes) drive the workers: each only waits on its child, and ``subprocess`` without a
``preexec_fn`` is thread-safe.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llm_pipeline.config import ConfigError, StrictModel

_LAUNCHER = Path(__file__).with_name("_sandbox_launch.py")
_FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
Status = Literal["passed", "failed", "timed_out", "error"]


class SandboxLimits(StrictModel):
    """Per-program limits (the ``humaneval.sandbox`` config section)."""

    timeout_s: float = Field(10.0, gt=0, description="Wall-clock seconds per program (CPU limit: this + 1).")
    memory_mb: int = Field(1024, gt=0, description="Address-space limit (RLIMIT_AS).")
    max_file_mb: int = Field(16, gt=0, description="Largest file a program may write (RLIMIT_FSIZE).")
    max_processes: int = Field(4, gt=0, description="Processes/threads per program (RLIMIT_NPROC): stops fork bombs.")
    isolate_network: bool = Field(True, description="Run in a new, empty network namespace where the OS allows.")
    landlock: bool = Field(True, description="Confine writes and deletions to the scratch directory (Linux >= 5.13).")
    uid_base: int = Field(
        1_879_000_000,
        gt=0,
        description="As root, worker slot s of evaluator process p runs as uid_base + (p mod 10000)*100 + s: "
        "far above real users' uids and distinct between evaluators running side by side.",
    )
    python: str | None = Field(
        None, description="Interpreter for the programs; default: ours, or a system python3 the sandbox uid can read."
    )
    allow_unconfined_root: bool = Field(
        False, description="As root with no interpreter the sandbox uid can read: run as root anyway (unsafe)."
    )


@dataclass
class ExecutionResult:
    """Outcome of one program: ``passed`` means it ran to its end and exited 0."""

    status: Status
    returncode: int | None
    wall_s: float
    stdout: str = ""
    stderr: str = ""
    isolation: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _readable_by_others(path: Path) -> bool:
    """True if an unprivileged uid can execute ``path`` (every ancestor searchable by 'other')."""
    try:
        real = path.resolve(strict=True)
    except OSError:
        return False
    if not real.stat().st_mode & stat.S_IXOTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _live_pids_of_uid(uid: int) -> list[int]:
    """Processes owned by ``uid`` that are not already dead (zombies wait for their reaper)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry.path).st_uid != uid:
                continue
            with open(f"{entry.path}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            pids.append(int(entry.name))
    return pids


def _kill_uid(uid: int, rounds: int = 100) -> None:
    """SIGKILL every process owned by ``uid`` (catches children that left the process group)."""
    for _ in range(rounds):
        pids = _live_pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


class Sandbox:
    """Executes programs with :class:`SandboxLimits`, ``workers`` at a time."""

    def __init__(self, limits: SandboxLimits | None = None, *, workers: int = 2) -> None:
        if not 1 <= workers <= 100:
            raise ValueError(f"workers must be between 1 and 100, got {workers}")
        self.limits = limits or SandboxLimits()
        self.workers = workers
        self.is_root = os.geteuid() == 0
        self.python, self.drop_uid = self._choose_python()
        self._slots: queue.Queue[int] = queue.Queue()
        for i in range(workers):
            self._slots.put(i)
        self._private = Path(tempfile.mkdtemp(prefix="llm-sandbox-io-"))  # evaluator-only: outputs, reports
        self._isolation: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _choose_python(self) -> tuple[str, bool]:
        if self.limits.python:
            py = Path(self.limits.python)
            if not py.is_file():
                raise ConfigError(f"sandbox python {py} not found")
            return str(py), self.is_root and _readable_by_others(py)
        current = Path(getattr(sys, "_base_executable", sys.executable) or sys.executable)
        if not self.is_root:
            return str(current), False
        for cand in (current, *map(Path, _FALLBACK_PYTHONS)):
            if cand.is_file() and _readable_by_others(cand):
                return str(cand), True
        if self.limits.allow_unconfined_root:
            return str(current), False
        raise ConfigError(
            "running as root, but no Python interpreter is readable by an unprivileged uid, so programs "
            "could not be confined (root ignores RLIMIT_NPROC and file permissions). Install a system "
            "python3, set humaneval.sandbox.python to one, run as a normal user, or set "
            "humaneval.sandbox.allow_unconfined_root=true to accept the risk."
        )

    def slot_uid(self, slot: int) -> int | None:
        """The unprivileged uid that worker ``slot`` runs programs as (None when not dropping privileges)."""
        if not self.drop_uid:
            return None
        return self.limits.uid_base + (os.getpid() % 10000) * 100 + slot

    def close(self) -> None:
        shutil.rmtree(self._private, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def isolation(self) -> dict[str, Any]:
        """What this machine enforces, measured once by running an empty program."""
        with self._lock:
            if self._isolation is None:
                res = self.run("pass")
                self._isolation = {
                    **res.isolation,
                    "probe_status": res.status,
                    "python": self.python,
                    "uid_drop": self.drop_uid,
                    "limits": self.limits.model_dump(),
                }
            return self._isolation

    def run(self, source: str) -> ExecutionResult:
        """Run one program; thread-safe (takes a free worker slot)."""
        slot = self._slots.get()
        try:
            return self._run_in_slot(source, slot)
        finally:
            self._slots.put(slot)

    def _run_in_slot(self, source: str, slot: int) -> ExecutionResult:
        lim = self.limits
        uid = self.slot_uid(slot)
        scratch = Path(tempfile.mkdtemp(prefix="llm-sandbox-", dir="/tmp" if self.drop_uid else None))
        io_dir = Path(tempfile.mkdtemp(dir=self._private))
        marker = f"__sandbox_done_{secrets.token_hex(8)}__"
        program = scratch / "main.py"
        # The marker proves the program reached its end (an early sys.exit(0) is not a pass).
        program.write_text(f"{source}\n\nprint({marker!r})\n", encoding="utf-8")
        program.chmod(0o644)
        if uid is not None:
            os.chown(scratch, uid, uid)
        scratch.chmod(0o700)
        spec = {
            "scratch": str(scratch),
            "program": str(program),
            "python": self.python,
            "report": str(io_dir / "isolation.json"),
            "uid": uid,
            "memory_bytes": lim.memory_mb << 20,
            "cpu_seconds": max(1, int(lim.timeout_s + 1)),
            "file_bytes": lim.max_file_mb << 20,
            "max_processes": lim.max_processes,
            "isolate_network": lim.isolate_network,
            "landlock": lim.landlock,
        }
        out_path, err_path = io_dir / "stdout", io_dir / "stderr"
        start = time.monotonic()
        status: Status
        try:
            with out_path.open("wb") as out, err_path.open("wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", str(_LAUNCHER), json.dumps(spec)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=str(scratch),
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                    start_new_session=True,
                    close_fds=True,
                )
                try:
                    rc: int | None = proc.wait(timeout=lim.timeout_s)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    rc, timed_out = None, True
                finally:
                    self._kill_all(proc, uid)
                    if rc is None:
                        proc.wait()
            wall = time.monotonic() - start
            stdout, stderr = _tail(out_path), _tail(err_path)
            try:
                report = json.loads((io_dir / "isolation.json").read_text())
            except (OSError, ValueError):
                report = {}
            if timed_out:
                status = "timed_out"
            elif not report:
                status = "error"  # the launcher itself failed: a sandbox problem, not the program's
            elif rc == 0 and stdout.rstrip().endswith(marker):
                status = "passed"
            else:
                status = "failed"
            stdout = stdout.replace(marker, "").rstrip("\n")
            return ExecutionResult(status, rc, wall, stdout, stderr, report)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(io_dir, ignore_errors=True)

    @staticmethod
    def _kill_all(proc: subprocess.Popen[bytes], uid: int | None) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if uid is not None:
            _kill_uid(uid)

    def run_many(
        self,
        sources: Sequence[str],
        *,
        on_done: Callable[[int, ExecutionResult], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[ExecutionResult | None]:
        """Run all programs on ``workers`` threads; ``should_stop()`` true cancels what has not started."""
        results: list[ExecutionResult | None] = [None] * len(sources)
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox") as pool:
            futures = {pool.submit(self.run, src): i for i, src in enumerate(sources)}
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                if on_done is not None:
                    on_done(i, results[i])  # type: ignore[arg-type]
                if should_stop is not None and should_stop():
                    for f in futures:
                        f.cancel()
                    break
        return results
