"""Example-aligned ("row") batch sources: the contract between SFT/DPO data and the trainer.

A row is what one batch row holds: a packed set of SFT examples, one padded example, or one
preference pair. Every epoch has the same number of rows ``R`` in an order that depends only on
``seed + epoch``, so every rank computes the same order without talking to the others. The rows of
all epochs form one stream; rank ``r`` of ``W`` takes stream positions ``r, r + W, r + 2W, ...``.
A rank's only state is how many rows it has consumed: resume is exact at the next row, the ranks
stay disjoint, each epoch is covered exactly once over all ranks (a block of ``W`` rows may straddle
an epoch boundary), and changing the micro-batch size (OOM fallback) changes nothing of that.

``repeat=False`` (validation) is one pass over epoch 0: every rank yields ``ceil(ceil(R / W) /
micro)`` micro-batches, filling its missing rows with filler rows that carry no loss, because
under FSDP every rank must run the same number of forwards. Then ``StopIteration``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


class RowBatchSource(ABC):
    """Base of :class:`~llm_pipeline.data.sft.SFTBatchSource` and the preference source.

    Subclasses say how many rows an epoch has, build an epoch's row order, and collate rows (``None`` =
    filler row) into tensors with rows on dim 0.
    """

    kind: str = "rows"

    def __init__(self, *, micro_batch_size: int, seed: int, rank: int, world_size: int, repeat: bool) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.seed, self.rank, self.world_size, self.repeat = int(seed), rank, world_size, repeat
        self.position = 0  # rows of the stream this rank has consumed
        self._epochs: dict[int, Any] = {}
        self.set_micro_batch_size(micro_batch_size)

    # ---- what a subclass provides -------------------------------------------------------

    @property
    @abstractmethod
    def rows_per_epoch(self) -> int:
        """Rows of one epoch over all ranks (``num_epochs * rows_per_epoch / global rows`` = steps)."""

    @abstractmethod
    def _build_epoch(self, epoch: int) -> Any:
        """The epoch's rows in order (anything :meth:`_collate` understands, indexed by row number)."""

    @abstractmethod
    def _collate(self, epoch_rows: list[tuple[Any, int] | None]) -> Batch:
        """Tensors for ``(epoch plan, row index)`` pairs; ``None`` is a filler row (no loss)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Identity of the data (refuses to resume a state from other data)."""

    def _state_extra(self) -> dict[str, Any]:
        """Settings that change the rows (checked on resume)."""
        return {}

    # ---- the protocol -------------------------------------------------------------------

    def set_micro_batch_size(self, rows: int) -> None:
        """Rows per :meth:`next_batch` (the trainer lowers it on OOM); the stream position is kept."""
        if rows <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {rows}")
        self.micro_batch_size = int(rows)

    @property
    def epoch(self) -> int:
        """Epoch of the next row of this rank."""
        return (self.position * self.world_size + self.rank) // self.rows_per_epoch

    @property
    def rows_per_rank(self) -> int:
        """Rows of one finite pass on each rank (filler rows included)."""
        return math.ceil(self.rows_per_epoch / self.world_size)

    def _plan(self, epoch: int) -> Any:
        plan = self._epochs.get(epoch)
        if plan is None:
            plan = self._build_epoch(epoch)
            self._epochs = {e: p for e, p in self._epochs.items() if e >= epoch - 1}  # a block spans <= 2 epochs
            self._epochs[epoch] = plan
        return plan

    def next_batch(self) -> Batch:
        """The next ``micro_batch_size`` rows of this rank; ``StopIteration`` after a finite pass."""
        rows_total = self.rows_per_epoch
        if not self.repeat and self.position >= self.rows_per_rank:
            raise StopIteration
        picked: list[tuple[Any, int] | None] = []
        for k in range(self.position, self.position + self.micro_batch_size):
            g = k * self.world_size + self.rank
            if not self.repeat:
                picked.append((self._plan(0), g) if g < rows_total and k < self.rows_per_rank else None)
            else:
                picked.append((self._plan(g // rows_total), g % rows_total))
        self.position += self.micro_batch_size
        return self._collate(picked)

    def __iter__(self) -> RowBatchSource:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (loads with ``torch.load(weights_only=True)``)."""
        return {  # checked on load in this order: the most telling mismatch is named first
            "kind": self.kind,
            "fingerprint": self.fingerprint(),
            **self._state_extra(),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "repeat": self.repeat,
            "rows_per_epoch": self.rows_per_epoch,
            "position": self.position,
            "micro_batch_size": self.micro_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the exact next row; refuse a state from other data, settings or sharding."""
        mine = self.state_dict()
        for key, value in mine.items():
            if key in ("position", "micro_batch_size"):
                continue
            if key not in state:
                raise ValueError(f"{self.kind} batch source state lacks {key!r}: not a state of this kind of source")
            if state[key] != value:
                what = "other data" if key in ("fingerprint", "num_examples", "num_pairs") else "other settings"
                raise ValueError(
                    f"{self.kind} batch source state has {key}={state[key]!r}, this source has {value!r}: "
                    f"it comes from {what} and cannot be resumed exactly"
                )
        self.position = int(state["position"])
        self.set_micro_batch_size(int(state["micro_batch_size"]))
