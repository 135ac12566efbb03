"""Out-of-memory recovery: recognise the error, give the memory back, choose a smaller micro-batch.

The global batch never changes: the micro-batch becomes a divisor of itself (about half) and
accumulation grows to match. The step that failed is replayed by splitting the micro-batches already
fetched along their rows, so no data is skipped or repeated, whatever the batch's keys or widths.
"""

from __future__ import annotations

import gc
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def is_oom(exc: BaseException) -> bool:
    """CUDA (or any device) allocator failure, including the plain RuntimeError older paths raise."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Drop gradients and any gathered FSDP params, collect, return cached blocks to the driver."""
    from llm_pipeline.train.parallel import reshard_all

    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    reshard_all(model)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def largest_divisor_at_most(n: int, cap: int) -> int:
    """Largest d with d | n and d <= cap (at least 1)."""
    for d in range(min(n, max(cap, 1)), 0, -1):
        if n % d == 0:
            return d
    return 1


def halve_micro_batch(micro: int) -> int:
    """Next smaller micro-batch: the largest divisor of ``micro`` at most half of it (so each fetched
    micro-batch splits into equal parts and the rows of a step stay the same); error at 1 row."""
    if micro <= 1:
        raise torch.OutOfMemoryError(
            "out of memory with a micro-batch of 1 row: OOM recovery cannot shrink further; "
            "enable activation checkpointing, use more GPUs (FSDP) or a shorter sequence"
        )
    return largest_divisor_at_most(micro, micro // 2)
