"""SFT data: conversations -> examples (token ids + trained-token mask) -> packed rows -> batches.

* An example is ``<|bos|>`` and the rendered conversation; its trained tokens are every assistant reply
  and its end-of-turn token (``train_on_prompt`` trains all). Over-long examples lose their tail
  (``truncation: truncate``; the prompt comes first so it is kept) or are dropped; an example left with
  no trained token is dropped. All of it is counted; dropped examples go to the rejects file.
* Packing is best-fit-decreasing into rows of ``max_seq_len``: an example is never split. Each epoch
  re-draws the order among equal lengths and the row order from ``seed + epoch``.
* :class:`SFTBatchSource` serves the rows with the row-source contract of :mod:`llm_pipeline.data.rows`.

Batches (int64, rows on dim 0): ``input_ids`` [B,T]; ``labels`` [B,T], already shifted (position t holds
token t+1 when it is trained, else -100; never a target across two examples); ``document_ids`` [B,T]
(segment number in the row, -1 on padding). Packed: T = max_seq_len; not packed: the longest row.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llm_pipeline.data.chat import ChatTemplate, RecordError, parse_conversation
from llm_pipeline.data.chat_sources import build_chat_sources, pad_id_of
from llm_pipeline.data.config import SFTDataConfig
from llm_pipeline.data.loader import IGNORE_INDEX
from llm_pipeline.data.rows import Batch, RowBatchSource
from llm_pipeline.hashing import bytes_digest

log = logging.getLogger(__name__)


@dataclass
class TokenExamples:
    """Token sequences with a trained mask in flat arrays (compact for millions of examples).

    Example i is ``tokens[offsets[i]:offsets[i+1]]``. SFT examples, and each side of DPO pairs, are these.
    """

    tokens: np.ndarray  # int32 [total tokens]
    trained: np.ndarray  # bool [total tokens]: the token is a training target
    offsets: np.ndarray  # int64 [n + 1]
    counts: dict[str, int] = field(default_factory=dict)  # how the build went (truncated, dropped, ...)
    _fingerprint: str | None = field(default=None, repr=False)

    @classmethod
    def from_lists(
        cls, examples: Sequence[tuple[Sequence[int], Sequence[int]]], counts: dict[str, int] | None = None
    ) -> TokenExamples:
        lengths = np.fromiter((len(ids) for ids, _ in examples), np.int64, len(examples))
        offsets = np.zeros(len(examples) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if not examples:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.bool_), offsets, dict(counts or {}))
        tokens = np.concatenate([np.asarray(ids, np.int32) for ids, _ in examples])
        trained = np.concatenate([np.asarray(mask, np.bool_) for _, mask in examples])
        return cls(tokens, trained, offsets, dict(counts or {}))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and trained mask of example ``i``."""
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.tokens[s:e], self.trained[s:e]

    @property
    def num_trained(self) -> int:
        """Trained tokens that are targets (an example's first token never is)."""
        return int(self.trained.sum() - self.trained[self.offsets[:-1]].sum()) if len(self) else 0

    def fingerprint(self) -> str:
        """sha256 of the examples: a resumed run must see the very same data."""
        if self._fingerprint is None:
            arrays = (self.offsets, self.tokens, self.trained)
            self._fingerprint = bytes_digest(*(np.ascontiguousarray(a).data for a in arrays))
        return self._fingerprint


def fit_example(
    ids: Sequence[int], mask: Sequence[int], *, max_seq_len: int, truncation: str, train_on_prompt: bool = False
) -> tuple[list[int], list[int], bool]:
    """Apply ``train_on_prompt`` and the length limit; returns (ids, mask, truncated) or raises RecordError."""
    ids, mask = list(ids), [1] * len(ids) if train_on_prompt else list(mask)
    truncated = len(ids) > max_seq_len
    if truncated:
        if truncation == "drop":
            raise RecordError("too_long", f"{len(ids)} tokens > max_seq_len={max_seq_len}")
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    if not any(mask[1:]):
        if truncated:
            raise RecordError("no_trained_tokens_after_truncation", f"the first {max_seq_len} tokens are all prompt")
        raise RecordError("no_trained_tokens", "the template marked no assistant token")
    return ids, mask, truncated


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def pack_best_fit(
    lengths: np.ndarray, capacity: int, tie_order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing bin packing: ``(items, row_offsets)``, row r = ``items[row_offsets[r]:row_offsets[r+1]]``.

    Examples are placed longest first (equal lengths in ``tie_order``), each into the open row with the
    least room that still fits it. Open rows are kept by remaining room in a sorted list of distinct
    room values (at most ``capacity`` of them) with a stack of rows per value, so a placement is a binary
    search: O(n log n) for the sort plus O(n log C) for the placements, no scan over rows. Rows with
    less room than the shortest example are closed for good.
    """
    n = len(lengths)
    if n and int(lengths.max()) > capacity:
        raise ValueError(f"an example has {int(lengths.max())} tokens > row capacity {capacity}")
    order = np.arange(n) if tie_order is None else np.asarray(tie_order)
    order = order[np.argsort(-lengths[order], kind="stable")]
    shortest = int(lengths.min()) if n else 0
    rooms: list[int] = []  # sorted distinct remaining room of open rows
    open_rows: dict[int, list[int]] = {}
    row_of = np.empty(n, np.int64)
    num_rows = 0
    for i, length in zip(order.tolist(), lengths[order].tolist(), strict=True):
        j = bisect.bisect_left(rooms, length)
        if j == len(rooms):
            row, room = num_rows, capacity - length
            num_rows += 1
        else:
            stack = open_rows[rooms[j]]
            row, room = stack.pop(), rooms[j] - length
            if not stack:
                del open_rows[rooms[j]]
                rooms.pop(j)
        row_of[i] = row
        if room >= shortest and room > 0:
            if room not in open_rows:
                bisect.insort(rooms, room)
                open_rows[room] = []
            open_rows[room].append(row)
    items = order[np.argsort(row_of[order], kind="stable")]  # rows in order, examples in placement order
    row_offsets = np.zeros(num_rows + 1, np.int64)
    np.cumsum(np.bincount(row_of, minlength=num_rows), out=row_offsets[1:])
    return items, row_offsets


def reorder_rows(items: np.ndarray, row_offsets: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same rows in the order ``perm`` (vectorised gather)."""
    counts = np.diff(row_offsets)[perm]
    new_offsets = np.zeros(len(perm) + 1, np.int64)
    np.cumsum(counts, out=new_offsets[1:])
    gather = np.repeat(row_offsets[:-1][perm] - new_offsets[:-1], counts) + np.arange(int(new_offsets[-1]))
    return items[gather], new_offsets


# --------------------------------------------------------------------------------------------
# The batch source
# --------------------------------------------------------------------------------------------


class SFTBatchSource(RowBatchSource):
    """Packed (or one-per-row padded) SFT rows with exact resume and rank sharding (see :mod:`.rows`)."""

    kind = "sft"

    def __init__(
        self,
        examples: TokenExamples,
        *,
        max_seq_len: int,
        micro_batch_size: int,
        packing: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        repeat: bool = True,
        pad_id: int = 0,
    ) -> None:
        if len(examples) == 0:
            raise ValueError("SFTBatchSource needs at least one example")
        if int(examples.lengths.max()) > max_seq_len:
            raise ValueError(f"an example is longer than max_seq_len={max_seq_len}: truncate or drop it first")
        self.examples, self.max_seq_len, self.packing, self.pad_id = examples, max_seq_len, packing, pad_id
        self._lengths = examples.lengths
        self._yielded_tokens = self._yielded_slots = 0
        super().__init__(micro_batch_size=micro_batch_size, seed=seed, rank=rank, world_size=world_size, repeat=repeat)
        self._num_rows = len(self._plan(0)[1]) - 1

    @property
    def rows_per_epoch(self) -> int:
        return self._num_rows

    @property
    def mean_examples_per_row(self) -> float:
        """Examples per row on average (a mixture weighting examples draws rows at weight / this)."""
        return len(self.examples) / self.rows_per_epoch

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed + epoch)
        n = len(self.examples)
        if not self.packing:
            return rng.permutation(n), np.arange(n + 1, dtype=np.int64)
        items, offsets = pack_best_fit(self._lengths, self.max_seq_len, rng.permutation(n))
        if epoch and len(offsets) - 1 != self._num_rows:  # BFD's row count does not depend on the tie order
            raise RuntimeError(f"epoch {epoch} packed into {len(offsets) - 1} rows, epoch 0 into {self._num_rows}")
        return reorder_rows(items, offsets, rng.permutation(len(offsets) - 1))

    def _row_examples(self, plan: tuple[np.ndarray, np.ndarray], row: int) -> np.ndarray:
        items, offsets = plan
        return items[offsets[row] : offsets[row + 1]]

    def _collate(self, picked: list[tuple[Any, int] | None]) -> Batch:
        rows = [self._row_examples(*p) if p is not None else None for p in picked]
        lengths = [int(self._lengths[r].sum()) if r is not None else 0 for r in rows]
        t = self.max_seq_len if self.packing else max([1, *lengths])
        b = len(rows)
        inputs = np.full((b, t), self.pad_id, np.int64)
        labels = np.full((b, t), IGNORE_INDEX, np.int64)
        docs = np.full((b, t), -1, np.int64)
        ex = self.examples
        for i, row in enumerate(rows):
            if row is None:
                continue
            pos = 0
            for seg, e in enumerate(row.tolist()):
                s, end = int(ex.offsets[e]), int(ex.offsets[e + 1])
                n = end - s
                inputs[i, pos : pos + n] = ex.tokens[s:end]
                # the target of position p is token p+1 of the same example, if trained; the last has none
                labels[i, pos : pos + n - 1] = np.where(ex.trained[s + 1 : end], ex.tokens[s + 1 : end], IGNORE_INDEX)
                docs[i, pos : pos + n] = seg
                pos += n
        self._yielded_tokens += sum(lengths)
        self._yielded_slots += b * t
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "document_ids": torch.from_numpy(docs),
        }

    def fingerprint(self) -> str:
        return self.examples.fingerprint()

    def _state_extra(self) -> dict[str, Any]:
        return {"max_seq_len": self.max_seq_len, "packing": self.packing, "num_examples": len(self.examples)}

    def stats(self) -> dict[str, float]:
        """Examples, tokens, packing efficiency (real tokens / row capacity) and the build's counts."""
        tokens = int(self._lengths.sum())
        out: dict[str, float] = {
            "examples": len(self.examples),
            "tokens": tokens,
            "trained_tokens": self.examples.num_trained,
            "rows_per_epoch": self.rows_per_epoch,
            "mean_examples_per_row": len(self.examples) / self.rows_per_epoch,
            "packing_efficiency": tokens / (self.rows_per_epoch * self.max_seq_len),
        }
        if self._yielded_slots:
            out["batch_fill"] = self._yielded_tokens / self._yielded_slots  # padded batches: real / slots yielded
        out.update({k: float(v) for k, v in self.examples.counts.items()})
        return out


# --------------------------------------------------------------------------------------------
# Building the stage's sources
# --------------------------------------------------------------------------------------------


def build_sft_sources(
    cfg: SFTDataConfig,
    tokenizer_dir: str | os.PathLike[str],
    *,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    output_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
) -> tuple[SFTBatchSource, SFTBatchSource | None, dict[str, Any]]:
    """Read, tokenise and pack the SFT data: ``(train source, val source or None, report)``.

    Every rank builds the same examples (deterministic) and only rank 0 writes the rejects file. The
    chat template comes from ``tokenizer_dir`` (ours when it has none: ``report["chat_template"]`` is
    then ``"default"`` and the stage's export should store it with :func:`~.chat.write_chat_template`).
    """
    template = ChatTemplate.from_dir(tokenizer_dir)  # an unusable template stops here, before any data
    common: dict[str, Any] = {
        "max_seq_len": cfg.max_seq_len,
        "micro_batch_size": micro_batch_size,
        "packing": cfg.packing,
        "seed": cfg.seed if cfg.seed is not None else seed,
        "rank": rank,
        "world_size": world_size,
        "pad_id": pad_id_of(template),
    }

    def make_source(split: str, examples: list[tuple[list[int], list[int], bool]]) -> SFTBatchSource:
        data = TokenExamples.from_lists(
            [(ids, mask) for ids, mask, _ in examples], {"truncated": sum(t for *_, t in examples)}
        )
        return SFTBatchSource(data, repeat=split == "train", **common)

    sources, report = build_chat_sources(
        cfg,
        template,
        "sft",
        parse=lambda record: parse_conversation(record, cfg.format, cfg.columns),
        encode=template.encode_many,
        fit=lambda enc: fit_example(
            *enc, max_seq_len=cfg.max_seq_len, truncation=cfg.truncation, train_on_prompt=cfg.train_on_prompt
        ),
        make_source=make_source,
        rank=rank,
        output_dir=output_dir,
        show_progress=show_progress,
    )
    return sources["train"], sources.get("val"), report
