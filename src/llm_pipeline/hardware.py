"""This machine's software and accelerators: versions, GPUs, FP8 capability, free memory, CPU load.

The device part of the pre-flight (``llm-pipeline preflight``) and all of ``scripts/gpu_utils.py``. GPUs
can be simulated (``gpus``, ``gpu_memory_gib``, ``gpu_capability``) to plan for a cluster from a laptop.
"""

from __future__ import annotations

import logging
import os
import platform
import time
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


# --------------------------------------------------------------------------------------------
# CPU oversubscription: training threads competing with other work for the cores
# --------------------------------------------------------------------------------------------
# torch's CPU kernels run on OpenMP threads (one per core by default) that spin-wait for each other
# at every parallel region: when another process holds one of those cores, every region waits for
# the thread that is not running. A demo step of 2 s on two idle cores took 29 s with two threads
# and other load on the machine.


@dataclass(frozen=True)
class CpuLoad:
    """How many cores a CPU run wants against how many are free for it."""

    cores: float  # CPUs this process may use (affinity and cgroup quota)
    threads: int  # intra-op threads of each training process here (torch's, i.e. OMP_NUM_THREADS)
    ranks: int  # training processes on this machine
    others: float  # cores' worth of CPU time taken by other work (measured, or the load average)

    @property
    def free_cores(self) -> int:
        return max(1, int(self.cores - self.others + 0.5) // self.ranks)

    @property
    def oversubscribed(self) -> bool:
        """Our threads plus the others' work exceed the cores by half a core or more, and we could use fewer."""
        wanted = self.threads * self.ranks
        return self.others >= 0.5 and wanted + self.others >= self.cores + 0.5 and self.threads > self.free_cores

    def warning(self) -> str | None:
        """The warning with its fix, or None when the cores suffice."""
        if not self.oversubscribed:
            return None
        k = self.free_cores
        given = os.environ.get("OMP_NUM_THREADS")
        now = f"OMP_NUM_THREADS={given} is set" if given else "torch uses one thread per core by default"
        per = f"{self.threads} thread(s) per process x {self.ranks} process(es)" if self.ranks > 1 else (
            f"{self.threads} threads")  # fmt: skip
        return (
            f"CPU oversubscribed: this run wants {per} on {self.cores:g} cores while other work keeps "
            f"{self.others:.1f} cores busy ({now}). OpenMP threads waiting for a busy core can make every step "
            f"many times slower. Run with OMP_NUM_THREADS={k} (e.g. `OMP_NUM_THREADS={k} llm-pipeline ...`, or "
            f"torch.set_num_threads({k}) in Python), or stop the other work"
        )


def usable_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> float:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1.0, int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return cores


def _busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def measure_cpu_load(threads: int, *, ranks: int = 1, window: float = 0.2) -> CpuLoad:
    """This machine's CPU load from other work, for a run of ``ranks`` processes of ``threads`` threads.

    The 1-minute load average bounds the others' share from above (it counts this process too): when it
    leaves room, nothing is sampled. Otherwise all cores' busy time over ``window`` seconds, minus this
    process's own, gives the others' share now (Linux; elsewhere the load average is used as it is).
    With several ranks the other ranks' threads are not counted as other work.
    """
    cores = usable_cores()
    try:
        others = os.getloadavg()[0]
    except OSError:
        others = 0.0
    if others >= 0.5 and threads * ranks + others >= cores + 0.5:
        busy0, own0, t0 = _busy_seconds(), _own_seconds(), time.monotonic()
        if busy0 is not None:
            time.sleep(window)
            busy1, own1, t1 = _busy_seconds(), _own_seconds(), time.monotonic()
            assert busy1 is not None
            others = max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-3)
            others = max(0.0, others - (ranks - 1) * threads)
    return CpuLoad(cores=cores, threads=threads, ranks=ranks, others=others)


def warn_if_cpu_oversubscribed(device_type: str, logger: logging.Logger | None = None) -> CpuLoad | None:
    """At a CPU run's start: measure, and log a warning with the fix when the cores are oversubscribed.

    Returns the measurement (None on a GPU run, where the CPU threads do not set the pace).
    """
    if device_type != "cpu":
        return None
    import torch

    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    load = measure_cpu_load(torch.get_num_threads(), ranks=ranks)
    message = load.warning()
    if message:
        (logger or logging.getLogger(__name__)).warning(message)
    return load
