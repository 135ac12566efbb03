"""How a stage's global batch is cut into micro-batches, in the stage's own unit.

Two kinds of batch sources feed the loop:

- **token streams** (pretraining): rows are windows of ``seq_len`` tokens cut from one stream; the
  global batch is counted in tokens and stays constant while a context-length curriculum changes
  ``seq_len``. The source implements ``set_seq_len(seq_len, micro_batch_size)``.
- **example-aligned sources** (SFT packed sequences, DPO pairs): a row is a whole example (or a
  packed row of whole examples), so the global batch is counted in rows and never cuts an example.
  The source implements ``set_micro_batch_size(rows)``.

Either way a step is ``accum`` micro-batches of ``micro`` rows per rank, and every tensor of a
batch has its rows on dim 0, so the OOM fallback can split micro-batches without knowing their keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from llm_pipeline.train import oom as oom_lib
from llm_pipeline.train.config import CurriculumStage, check_curriculum

Batch = dict[str, torch.Tensor]


@runtime_checkable
class BatchSource(Protocol):
    """What the loop needs from any data source: batches and an exact position to resume from."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class TokenSource(BatchSource, Protocol):
    """Windows of ``seq_len`` tokens from a stream (``llm_pipeline.data.loader.TokenBatchLoader``)."""

    def set_seq_len(self, seq_len: int, micro_batch_size: int) -> None: ...


@runtime_checkable
class RowSource(BatchSource, Protocol):
    """Whole examples per row (packed SFT sequences, preference pairs)."""

    def set_micro_batch_size(self, rows: int) -> None: ...


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: ``accum`` micro-batches of ``micro`` rows per rank (rows of ``seq_len`` tokens,
    or whole examples when ``seq_len`` is None)."""

    seq_len: int | None
    micro: int
    accum: int

    @property
    def rows(self) -> int:
        return self.micro * self.accum


def plan_step(global_batch_tokens: int, seq_len: int, world_size: int, micro_tokens: int) -> StepPlan:
    """Largest micro-batch within ``micro_tokens`` that divides this rank's rows exactly."""
    if global_batch_tokens % (seq_len * world_size):
        raise ValueError(
            f"global_batch_tokens ({global_batch_tokens}) must be a multiple of seq_len x ranks "
            f"({seq_len} x {world_size}); pick a global batch divisible by {seq_len * world_size}"
        )
    rows = global_batch_tokens // (seq_len * world_size)
    micro = oom_lib.largest_divisor_at_most(rows, micro_tokens // seq_len)
    return StepPlan(seq_len=seq_len, micro=micro, accum=rows // micro)


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Cut a micro-batch into ``parts`` equal micro-batches along dim 0 (rows), in order."""
    pieces = zip(*(v.chunk(parts) for v in batch.values()), strict=True)
    return [dict(zip(batch, piece, strict=True)) for piece in pieces]


class TokenBatching:
    """Global batch in tokens, rows of ``seq_len`` from the curriculum stage in force."""

    unit = "tokens"

    def __init__(self, global_batch_tokens: int, micro_batch_size: int, curriculum: Sequence[CurriculumStage]):
        self.global_batch_tokens = global_batch_tokens
        self.micro_batch_size = micro_batch_size
        self.curriculum = list(curriculum)
        check_curriculum(self.curriculum, global_batch_tokens)

    def seq_len_at(self, step: int) -> int:
        """The curriculum length for the step that follows ``step`` completed steps."""
        return [s for s in self.curriculum if s.step <= step][-1].seq_len

    def plan(self, step: int, world_size: int, micro_cap: int | None) -> StepPlan:
        # micro_batch_size is given at the first length; later lengths keep its tokens per forward.
        seq_len = self.seq_len_at(step)
        micro_tokens = self.micro_batch_size * self.curriculum[0].seq_len
        if micro_cap is not None:
            micro_tokens = min(micro_tokens, micro_cap)
        return plan_step(self.global_batch_tokens, seq_len, world_size, max(micro_tokens, seq_len))

    def cap_after_split(self, plan: StepPlan, micro: int) -> int:
        """The OOM cap kept for later steps (tokens per forward, so it carries across lengths)."""
        assert plan.seq_len is not None
        return micro * plan.seq_len

    @staticmethod
    def apply(source: Any, plan: StepPlan) -> None:
        source.set_seq_len(plan.seq_len, plan.micro)


class RowBatching:
    """Global batch in whole rows (``unit`` names them: sequences, pairs); no curriculum."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, unit: str = "sequences"):
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.unit = unit

    def plan(self, step: int, world_size: int, micro_cap: int | None) -> StepPlan:
        if self.global_batch_size % world_size:
            raise ValueError(
                f"training.global_batch_size ({self.global_batch_size} {self.unit}) must be a multiple of the "
                f"number of ranks ({world_size})"
            )
        rows = self.global_batch_size // world_size
        cap = self.micro_batch_size if micro_cap is None else min(self.micro_batch_size, micro_cap)
        micro = oom_lib.largest_divisor_at_most(rows, cap)
        return StepPlan(seq_len=None, micro=micro, accum=rows // micro)

    def cap_after_split(self, plan: StepPlan, micro: int) -> int:
        return micro

    @staticmethod
    def apply(source: Any, plan: StepPlan) -> None:
        source.set_micro_batch_size(plan.micro)


Batching = TokenBatching | RowBatching
