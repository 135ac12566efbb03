"""Where a benchmark ran: CPU model, the matmul-relevant ISA flags, threads and load (one line per bench).

CPU figures differ by machine kind far more than by run: an Intel Xeon with AMX multiplies bf16 at
several times its fp32 rate, an AMD EPYC without AVX512-BF16 multiplies bf16 slower than fp32. Every
bench prints :func:`machine_line` first, and ``docs/benchmarks.md`` keeps one table per :func:`machine_kind`.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: (cpuinfo flag, name printed): the vector/matrix units CPU matmuls and attention use.
FLAGS = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_bf16", "AVX512-BF16"),
    ("amx_tile", "AMX"),
    ("amx_bf16", "AMX-BF16"),
)


def cpu_model_and_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """The CPU's model name and its flags (Linux ``/proc/cpuinfo``; elsewhere the platform's name, no flags)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == platform.machine():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def machine_kind(model: str, flags: set[str]) -> str:
    """The table a figure belongs to in docs/benchmarks.md: the vendor and whether bf16 has AMX."""
    vendor = "Intel Xeon" if "Intel" in model else "AMD EPYC" if "AMD" in model else model
    if "amx_bf16" in flags:
        return f"{vendor} with AMX"
    if "avx512_bf16" in flags:
        return f"{vendor} with AVX512-BF16, no AMX"
    return f"{vendor} without AMX"


def machine_line() -> str:
    """``# machine: <kind> | <model> | flags | cores, threads | torch | load average`` for a bench's first line."""
    model, flags = cpu_model_and_flags()
    present = [name for flag, name in FLAGS if flag in flags]
    absent = [name for flag, name in FLAGS if flag not in flags]
    try:
        import torch

        threads = f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    except ImportError:
        threads = "no torch"
    omp = os.environ.get("OMP_NUM_THREADS")
    return (
        f"# machine: {machine_kind(model, flags)} | {model} | has {', '.join(present) or 'none'}; "
        f"lacks {', '.join(absent) or 'none'} | {os.cpu_count()} CPUs, {threads}"
        f"{f', OMP_NUM_THREADS={omp}' if omp else ''} | load average {load()}"
    )


def load() -> str:
    """1/5/15-minute load average: figures taken above ~0.5 per core are not idle-machine figures."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def rss_mib() -> float:
    """This process's resident memory now (MiB, from /proc): a bench's peak above it is its own working set."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
