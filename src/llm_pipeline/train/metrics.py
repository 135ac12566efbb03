"""Training metrics: MFU against an honest peak, and one writer for the trackers and the console.

MFU = model FLOPs per token (6·N + 12·L·H·Q·T, ``llm_pipeline.model.flops``) x tokens/s over the
peak of all devices. On GPU the peak is the datasheet dense bf16 (or fp8) figure; on CPU it is a
matmul measured here, because CPUs have no datasheet number worth trusting.

:class:`StepLogger` is the loop's side of it: it averages the steps since the last line into one
logged line every ``logging_steps``, and says "CPU oversubscribed" when steps suddenly slow down
while the machine has more runnable threads than cores (OpenMP spin-waiting then costs 10x or more).
Where the lines go (``metrics.jsonl``, TensorBoard, W&B, MLflow, trackio) is :mod:`llm_pipeline.train.trackers`.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import statistics
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from llm_pipeline.model.flops import measure_matmul_peak
from llm_pipeline.train.parallel import any_rank
from llm_pipeline.train.trackers import Outcome, RunInfo, Trackers, TrackingConfig

# Dense (no sparsity) tensor-core peaks in FLOP/s: (bf16, fp8). Matched by substring of the device name.
GPU_PEAKS: list[tuple[str, float, float | None]] = [
    ("H100 PCIe", 756e12, 1513e12),
    ("H100 NVL", 835e12, 1671e12),
    ("H100", 989.4e12, 1978.9e12),
    ("H200", 989.4e12, 1978.9e12),
    ("GH200", 989.4e12, 1978.9e12),
    ("B200", 2250e12, 4500e12),
    ("A100", 312e12, None),
    ("A10G", 70e12, None),
    ("L40S", 362e12, 733e12),
    ("L4", 121e12, 242.5e12),
]


@cache
def _cpu_peak(dtype: torch.dtype) -> float:
    return measure_matmul_peak(dtype, device="cpu")


def peak_flops(device: torch.device, *, precision: str, fp8: bool) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bf16, f8 in GPU_PEAKS:
            if key in name:
                if fp8 and f8 is not None:
                    return f8, f"{name} fp8 datasheet"
                return bf16, f"{name} bf16 datasheet"
        return 312e12, f"{name}: unknown GPU, assuming A100 bf16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return _cpu_peak(dtype), f"CPU measured {str(dtype).replace('torch.', '')} matmul"


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20


def format_line(
    step: int, max_steps: int, m: dict[str, float], extra: Sequence[tuple[str, str]] = (), note: str = ""
) -> str:
    """The console line: the numbers one glances at during a run (``extra``: an objective's own, after the
    loss; ``note``: a warning at the end of the line)."""
    parts = [f"step {step}/{max_steps}"]
    fmt = [
        ("loss", "loss {:.4f}"),
        ("ppl", "ppl {:.2f}"),
        *extra,
        ("lr", "lr {:.2e}"),
        ("grad_norm", "gnorm {:.3f}"),
        ("tokens_per_s", "{:,.0f} tok/s"),
        ("mfu", "MFU {:.1%}"),
        ("step_time_s", "{:.2f}s/step"),
        ("data_wait_frac", "data {:.0%}"),
        ("peak_mem_gib", "mem {:.2f}GiB"),
    ]
    for key, f in fmt:
        if m.get(key) is not None:
            parts.append(f.format(m[key]))
    if m.get("skipped_steps"):
        parts.append(f"skipped {int(m['skipped_steps'])}")
    if m.get("oom_events"):
        parts.append(f"OOM {int(m['oom_events'])}")
    if note:
        parts.append(note)
    return " | ".join(parts)


class MetricsWriter:
    """Rank 0 writes every tracker (``metrics.jsonl``, TensorBoard, ...) and a rich progress line; other ranks
    do nothing."""

    def __init__(
        self,
        log_dir: str | Path,
        *,
        enabled: bool = True,
        max_steps: int,
        start_step: int = 0,
        console_metrics: Sequence[tuple[str, str]] = (),
        trackers: Sequence[str] = ("jsonl", "tensorboard"),
        run: RunInfo | None = None,
    ) -> None:
        self.enabled = enabled
        self.max_steps = max_steps
        self.console_metrics = tuple(console_metrics)
        self._trackers: Trackers | None = None
        self._progress = None
        self._console = None
        if not enabled:
            return
        log_dir = Path(log_dir)
        self.jsonl_path = log_dir / "metrics.jsonl"
        run = run or RunInfo(log_dir=log_dir, stage="train")
        self._trackers = Trackers(trackers, replace(run, log_dir=log_dir, start_step=start_step))
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._console = Console(file=sys.stderr)
        if self._console.is_terminal:  # a live bar on a terminal; plain lines in log files
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[short]}"),
                console=self._console,
                transient=False,
            )
            self._task = self._progress.add_task("train", total=max_steps, completed=start_step, short="")
            self._progress.start()

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, step: int, metrics: dict[str, float | None], *, prefix: str = "train", note: str = "") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        assert self._trackers is not None
        self._trackers.log(step, prefix, clean)
        if self._progress is not None and prefix == "train":
            short = f"loss {clean.get('loss', float('nan')):.4f}  {clean.get('tokens_per_s', 0):,.0f} tok/s"
            self._progress.update(self._task, completed=step, short=short)
        self.message(f"[{prefix}] {format_line(step, self.max_steps, clean, self.console_metrics, note)}")

    def message(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self, outcome: Outcome = "completed") -> None:
        """Stop the bar and close every tracker with the run's outcome (also after a crash: "failed")."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._trackers is not None:
            trackers, self._trackers = self._trackers, None
            trackers.close(outcome)


class OversubscriptionWatch:
    """Notices steps that suddenly take ``factor`` x the running median while the load average exceeds the cores.

    On a busy machine OpenMP threads spin-wait for each other (a demo step went from 2 s to 29 s). The
    check costs a median of the recent step times per step and one ``os.getloadavg()`` at most every
    ``every`` steps, and only once a step was slow (or while the warning stands).
    """

    def __init__(
        self,
        *,
        factor: float = 3.0,
        history: int = 32,
        min_history: int = 5,
        every: int = 10,
        cores: int | None = None,
        loadavg: Callable[[], tuple[float, float, float]] | None = None,
    ) -> None:
        self.factor, self.min_history, self.every = factor, min_history, every
        self.cores = cores or os.cpu_count() or 1
        self._loadavg = loadavg or os.getloadavg
        self._times: deque[float] = deque(maxlen=history)
        self._checked_at: int | None = None
        self.note = ""  # shown on the progress line while the machine stays oversubscribed

    def update(self, step: int, step_time: float) -> str:
        """Record one step's time; returns the current note ("" when all is well)."""
        slow = len(self._times) >= self.min_history and step_time > self.factor * statistics.median(self._times)
        self._times.append(step_time)
        if (slow or self.note) and (self._checked_at is None or step - self._checked_at >= self.every):
            self._checked_at = step
            try:
                load = self._loadavg()[0]
            except OSError:  # no load average on this platform
                load = 0.0
            if load > self.cores:
                self.note = (
                    f"CPU oversubscribed (load {load:.1f} on {self.cores} cores: steps slowed down; "
                    "free the machine or lower OMP_NUM_THREADS)"
                )
            else:
                self.note = ""
        return self.note


def summarise(
    window: Sequence[Mapping[str, Any]],
    *,
    peak: float,
    world_size: int,
    device: torch.device,
    perplexity_of: str | None,
    counters: Mapping[str, int],
) -> dict[str, float | None]:
    """One logged line: averages over the steps since the last one (``counters``: the run's totals so far)."""
    last = window[-1]
    elapsed = sum(m["step_time_s"] for m in window)
    tokens = sum(m["tokens"] for m in window)
    flops = sum(m["flops"] for m in window)
    losses = [m["loss"] for m in window if math.isfinite(m["loss"])]
    loss = sum(losses) / len(losses) if losses else float("nan")
    # Perplexity of the objective's own metric (cross-entropy without the z-loss term).
    base = [m[perplexity_of] for m in window if perplexity_of in m and math.isfinite(m[perplexity_of])]
    ppl = math.exp(min(sum(base) / len(base), 50.0)) if base else None
    out: dict[str, float | None] = {
        "loss": loss,
        "ppl": ppl,
        "lr": last["lr"],
        "grad_norm": last["grad_norm"],
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "mfu": flops / elapsed / (peak * world_size) if elapsed > 0 and flops else None,
        "step_time_s": elapsed / len(window),
        "data_wait_frac": sum(m["data_time_s"] for m in window) / elapsed if elapsed > 0 else 0.0,
        "peak_mem_gib": peak_memory_gib(device),
        **{k: float(counters[k]) for k in ("skipped_steps", "empty_batches", "oom_events", "tokens_seen")},
        "units": sum(m["units"] for m in window) / len(window),
        "seq_len": float(last["seq_len"]) if last["seq_len"] is not None else None,
        "micro_batch_size": float(last["micro_batch_size"]),
    }
    for k in objective_metric_names(last):  # e.g. ce, z_loss: window means
        out[k] = sum(m[k] for m in window) / len(window)
    return out


# What the loop itself reports for every step; any other key of a step's metrics is the objective's.
LOOP_METRICS = frozenset(
    {"loss", "grad_norm", "lr", "skipped", "tokens", "flops", "units", "seq_len", "micro_batch_size",
     "accum_steps", "step_time_s", "data_time_s"}
)  # fmt: skip


def objective_metric_names(step_metrics: Mapping[str, Any]) -> list[str]:
    return [k for k in step_metrics if k not in LOOP_METRICS]


class StepLogger:
    """The loop's metrics for one run (rank 0 writes; every rank keeps the same window)."""

    def __init__(
        self,
        *,
        log_dir: str | Path,
        enabled: bool,
        max_steps: int,
        logging_steps: int,
        device: torch.device,
        world_size: int,
        precision: str,
        fp8: bool,
        perplexity_of: str | None,
        console_metrics: Sequence[tuple[str, str]] = (),
        trackers: Sequence[str] = ("jsonl", "tensorboard"),
        tracking: TrackingConfig | None = None,
        stage: str = "train",
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.log_dir, self.enabled = log_dir, enabled
        self.trackers = tuple(trackers)
        self.run = RunInfo(
            log_dir=Path(log_dir), stage=stage, config=dict(run_config or {}), options=tracking or TrackingConfig()
        )
        self.outcome: Outcome = "completed"
        self.max_steps, self.every = max_steps, logging_steps
        self.device, self.world_size, self.precision, self.fp8 = device, world_size, precision, fp8
        self.perplexity_of, self.console_metrics = perplexity_of, tuple(console_metrics)
        self.peak = 0.0
        self._writer: MetricsWriter | None = None
        self._window: list[dict[str, Any]] = []
        self._watch = OversubscriptionWatch()

    @contextlib.contextmanager
    def opened(self, start_step: int) -> Iterator[StepLogger]:
        """Open the writer (the trackers, a progress bar), state the MFU peak; close on leaving.

        The trackers are closed on every way out: with :attr:`outcome` (set by the loop: completed, preempted,
        diverged), or "failed" when the run raised, so a crashed run's tracker runs are flushed and finished.
        A tracker that cannot open on rank 0 stops every rank here, before the first step.
        """
        error: BaseException | None = None
        try:
            self._writer = MetricsWriter(
                self.log_dir,
                enabled=self.enabled,
                max_steps=self.max_steps,
                start_step=start_step,
                console_metrics=self.console_metrics,
                trackers=self.trackers,
                run=self.run,
            )
        except Exception as e:
            error = e
        if any_rank(error is not None, self.device):
            raise error or RuntimeError("rank 0 could not open the experiment trackers (see its error)")
        self._window = []
        self.outcome = "completed"
        assert self._writer is not None
        try:
            self.peak, source = peak_flops(self.device, precision=self.precision, fp8=self.fp8)
            self.message(f"MFU peak: {self.peak / 1e12:.2f} TFLOP/s per device ({source}) x {self.world_size}")
            yield self
        except BaseException:
            self._writer.close("failed")
            raise
        else:
            self._writer.close(self.outcome)
        finally:
            self._writer = None

    def step(self, step: int, metrics: dict[str, Any], counters: Mapping[str, int]) -> None:
        """After each optimizer step: advance the bar; every ``logging_steps`` (and at the end) log a line."""
        assert self._writer is not None
        self._writer.advance(step)
        self._window.append(metrics)
        note = self._watch.update(step, metrics["step_time_s"])
        if step % self.every == 0 or step == self.max_steps:
            line = summarise(
                self._window,
                peak=self.peak,
                world_size=self.world_size,
                device=self.device,
                perplexity_of=self.perplexity_of,
                counters=counters,
            )
            self._writer.log(step, line, note=note)
            self._window = []

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        assert self._writer is not None
        self._writer.log(step, dict(metrics), prefix="eval")

    def message(self, text: str) -> None:
        assert self._writer is not None
        self._writer.message(text)
