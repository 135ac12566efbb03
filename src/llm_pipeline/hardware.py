"""This machine's software and accelerators: versions, GPUs, FP8 capability, free memory.

The device part of the pre-flight (``llm-pipeline preflight``) and all of ``scripts/gpu_utils.py``. GPUs
can be simulated (``gpus``, ``gpu_memory_gib``, ``gpu_capability``) to plan for a cluster from a laptop.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm_pipeline.model.flops import GiB

Status = Literal["ok", "warn", "BLOCKER"]
MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 6)


@dataclass
class Check:
    """One line of a pre-flight report."""

    name: str
    status: Status
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class GPU:
    """One accelerator, real (``index``) or simulated for planning."""

    name: str
    memory: int  # bytes
    capability: tuple[int, int] | None  # None: unknown (simulated without --gpu-capability)
    index: int | None = None  # None: simulated


@dataclass
class Environment:
    """What a run would find on this machine."""

    python: str
    torch: str
    cuda: str | None
    nccl: str | None
    gpus: list[GPU]
    host_available: int  # bytes of RAM available now
    simulated: bool = False


def host_available_memory() -> int:
    """RAM available to a new allocation now (MemAvailable), not the machine's total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def probe_environment(
    *, gpus: int | None = None, gpu_memory_gib: float | None = None, gpu_capability: str | None = None
) -> Environment:
    """Versions and devices of this machine; ``gpus``/``gpu_memory_gib`` replace the GPUs by simulated ones."""
    import torch

    nccl = None
    if torch.cuda.is_available():
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError, TypeError):
            nccl = None
    found: list[GPU] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            found.append(GPU(p.name, int(p.total_memory), (p.major, p.minor), i))
    simulated = gpus is not None or gpu_memory_gib is not None
    if simulated:
        cap = tuple(int(x) for x in gpu_capability.split(".")) if gpu_capability else None
        count = gpus if gpus is not None else max(1, len(found))
        mem = int((gpu_memory_gib or (found[0].memory / GiB if found else 80.0)) * GiB)
        found = [GPU(f"simulated GPU ({mem / GiB:g} GiB)", mem, cap) for _ in range(count)]  # type: ignore[arg-type]
    return Environment(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        nccl=nccl,
        gpus=found,
        host_available=host_available_memory(),
        simulated=simulated,
    )


def environment_checks(env: Environment) -> list[Check]:
    """Python, torch, CUDA, NCCL, and one line per kind of GPU with its FP8 capability."""
    out = []
    py = tuple(int(x) for x in env.python.split(".")[:2])
    out.append(Check("python", "ok" if py >= MIN_PYTHON else "BLOCKER", f"{env.python} (needs >= 3.10)"))
    tv = tuple(int(x) for x in env.torch.split("+")[0].split(".")[:2])
    out.append(Check("torch", "ok" if tv >= MIN_TORCH else "BLOCKER", f"{env.torch} (needs >= 2.6: FSDP2, DCP)"))
    out.append(Check("CUDA", "ok", env.cuda or "none (CPU build of torch)"))
    out.append(Check("NCCL", "ok", env.nccl or "none (single process, or gloo on CPU)"))
    if not env.gpus:
        out.append(Check("GPUs", "ok", f"none; training runs on the CPU ({env.host_available / GiB:.1f} GiB RAM free)"))
    for gpu in {g.name: g for g in env.gpus}.values():
        n = sum(g.name == gpu.name for g in env.gpus)
        extra = ""
        if gpu.index is not None:
            import torch

            from llm_pipeline.train.metrics import peak_flops

            device = torch.device("cuda", gpu.index)
            peak, source = peak_flops(device, precision="bf16", fp8=False)
            free, _ = torch.cuda.mem_get_info(device)
            extra = f"; {free / GiB:.1f} GiB free on GPU {gpu.index}; bf16 peak {peak / 1e12:.0f} TFLOP/s ({source})"
        fp8, why = gpu_fp8(gpu)
        cap = f", capability {gpu.capability[0]}.{gpu.capability[1]}" if gpu.capability else ""
        fp8_text = "yes" if fp8 else f"{'unknown' if fp8 is None else 'no'} ({why})"
        out.append(Check("GPUs", "ok", f"{n} x {gpu.name}, {gpu.memory / GiB:.1f} GiB{cap}; FP8 {fp8_text}{extra}"))
    return out


def gpu_fp8(gpu: GPU) -> tuple[bool | None, str]:
    """Whether ``gpu`` can train in FP8 and why not (None: a simulated GPU of unknown capability)."""
    from llm_pipeline.train.parallel import FP8_MIN_CAPABILITY, fp8_supported

    if gpu.index is not None:
        import torch

        return fp8_supported(torch.device("cuda", gpu.index))
    if gpu.capability is not None:
        ok = gpu.capability >= FP8_MIN_CAPABILITY
        return ok, "" if ok else "compute capability below 8.9 (H100, H200, L4, L40S have it)"
    return None, "a simulated GPU: pass --gpu-capability 9.0"
