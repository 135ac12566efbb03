"""Run the ``llm-pipeline`` CLI with one injected fault (a kill -9 at a chosen point, a signal, a lying disk).

Usage: ``python driver.py <llm-pipeline arguments>`` with ``RELIABILITY_FAULT`` set to one of

- ``count-events:<file>``: no fault; write how many events the run had into <file> at exit;
- ``kill-at-event:<n>``: SIGKILL at the n-th event (an event is an optimizer step or a file-system
  call a save, a prune or an export makes: fsync, rename, replace, rmtree, safetensors write), i.e.
  anywhere in training, inside a save, during pruning or during the final export;
- ``kill-on-fsync:<text>``: SIGKILL at the first fsync of a file whose path contains <text>;
- ``kill-on-rename:<text>``: SIGKILL just before renaming a path whose name contains <text>;
- ``kill-after-rename:<text>``: SIGKILL just after renaming to a path whose name contains <text>;
- ``kill-in-rmtree:<text>``: when a folder whose name contains <text> is deleted, delete half of its
  files (in reverse name order: the commit marker goes late, the worst case) and SIGKILL;
- ``kill-in-export``: write half of the first safetensors file, then SIGKILL;
- ``signal-at-step:<n>:<SIGNAME>``: send the signal to this process during optimizer step n;
- ``pause-at-step:<n>:<file>``: during step n write <file>.ready and wait until <file> exists;
- ``disk-lies``: ``shutil.disk_usage`` reports 1 PiB free (so a write meets the real full disk).

Only Python's own functions are wrapped, before ``llm_pipeline`` is imported: the driver knows the CLI
and the file system, not the trainer's internals.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import time
import types
from pathlib import Path

FAULT = os.environ.get("RELIABILITY_FAULT", "")
KIND, _, ARG = FAULT.partition(":")
_events = 0
_steps = 0


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _event() -> None:
    global _events
    _events += 1
    if KIND == "kill-at-event" and _events == int(ARG):
        _die()


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


_fsync, _rename, _replace, _rmtree = os.fsync, os.rename, os.replace, shutil.rmtree


def fsync(fd: int) -> None:
    _event()
    if KIND == "kill-on-fsync" and ARG in _fd_path(fd):
        _die()
    _fsync(fd)


def _renamer(real):
    def rename(src, dst, *a, **k):
        _event()
        if KIND == "kill-on-rename" and ARG in os.path.basename(os.fspath(src)):
            _die()
        real(src, dst, *a, **k)
        if KIND == "kill-after-rename" and ARG in os.path.basename(os.fspath(dst)):
            _die()

    return rename


def rmtree(path, *a, **k):
    _event()
    p = Path(path)
    if KIND == "kill-in-rmtree" and ARG in p.name and p.is_dir():
        files = sorted((f for f in p.iterdir() if f.is_file()), reverse=True)
        for f in files[: max(1, len(files) // 2)]:
            f.unlink()
        _die()
    return _rmtree(path, *a, **k)


os.fsync = fsync
os.rename = _renamer(_rename)
os.replace = _renamer(_replace)
shutil.rmtree = rmtree

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

_save_file = safetensors.torch.save_file


def save_file(tensors, filename, *a, **k):
    _event()
    _save_file(tensors, filename, *a, **k)
    if KIND == "kill-in-export":
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        _die()


safetensors.torch.save_file = save_file

_zero_grad = torch.optim.Optimizer.zero_grad


def zero_grad(self, *a, **k):  # once per optimizer step, after the update
    global _steps
    _steps += 1
    _event()
    if KIND == "signal-at-step" and _steps == int(ARG.split(":")[0]):
        os.kill(os.getpid(), getattr(signal, ARG.split(":")[1]))
    if KIND == "pause-at-step" and _steps == int(ARG.split(":")[0]):
        release = Path(ARG.split(":", 1)[1])
        Path(f"{release}.ready").write_text(str(os.getpid()))
        while not release.exists():
            time.sleep(0.05)
    return _zero_grad(self, *a, **k)


torch.optim.Optimizer.zero_grad = zero_grad

if KIND == "disk-lies":
    shutil.disk_usage = lambda path: types.SimpleNamespace(total=1 << 50, used=0, free=1 << 50)

if KIND == "count-events":
    atexit.register(lambda: Path(ARG).write_text(str(_events)))

if __name__ == "__main__":
    from llm_pipeline.cli import main

    sys.exit(main(sys.argv[1:]))
