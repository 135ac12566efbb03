"""Training metrics: MFU against an honest peak, and one writer for TensorBoard, JSONL and the console.

MFU = model FLOPs per token (6·N + 12·L·H·Q·T, ``llm_pipeline.model.flops``) x tokens/s over the
peak of all devices. On GPU the peak is the datasheet dense bf16 (or fp8) figure; on CPU it is a
matmul measured here, because CPUs have no datasheet number worth trusting.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch

from llm_pipeline.model.flops import measure_matmul_peak

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


def format_line(step: int, max_steps: int, m: dict[str, float], extra: Sequence[tuple[str, str]] = ()) -> str:
    """The console line: the numbers one glances at during a run (``extra``: an objective's own, after the loss)."""
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
    return " | ".join(parts)


class MetricsWriter:
    """Rank 0 writes TensorBoard scalars, ``metrics.jsonl`` and a rich progress line; other ranks do nothing."""

    def __init__(
        self,
        log_dir: str | Path,
        *,
        enabled: bool = True,
        max_steps: int,
        start_step: int = 0,
        console_metrics: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.enabled = enabled
        self.max_steps = max_steps
        self.console_metrics = tuple(console_metrics)
        self._tb = None
        self._jsonl = None
        self._progress = None
        self._console = None
        if not enabled:
            return
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = log_dir / "metrics.jsonl"
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(log_dir))
        except ImportError as e:  # a dependency, but a broken install should not stop training
            logging.getLogger(__name__).warning("TensorBoard logging off (%s); metrics.jsonl is still written", e)
            self._tb = None
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

    def log(self, step: int, metrics: dict[str, float | None], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if self._progress is not None and prefix == "train":
            short = f"loss {clean.get('loss', float('nan')):.4f}  {clean.get('tokens_per_s', 0):,.0f} tok/s"
            self._progress.update(self._task, completed=step, short=short)
        self.message(f"[{prefix}] {format_line(step, self.max_steps, clean, self.console_metrics)}")

    def message(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
