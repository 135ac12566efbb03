"""Stop requests from outside: SIGTERM/SIGUSR1 (what schedulers send before a preemption) and Ctrl-C.

The handler only records the signal; the loop asks :meth:`StopSignals.requested` at each step
boundary (agreed by every rank) and then saves a checkpoint and stops. A second Ctrl-C exits at once:
the last committed checkpoint is intact, since saves are atomic.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

import torch

from llm_pipeline.train.parallel import any_rank

WATCHED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Installs the handlers for one run (main thread only) and restores the previous ones on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in WATCHED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            os.write(2, b"\nsecond Ctrl-C: exiting now without saving (the last checkpoint is intact)\n")
            os._exit(130)
        if signum == signal.SIGINT:
            os.write(2, b"\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: exit now)\n")
        self.received = signum

    def requested(self, device: torch.device) -> bool:
        """Whether any rank received a stop signal (a collective: every rank calls it at the same step)."""
        return any_rank(self.received is not None, device)

    def describe(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"
