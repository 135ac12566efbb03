"""Memory-mapped packed tokens -> training batches (used by the training loop).

Sampling design: a split's token stream (its shards concatenated) is cut into fixed-size chunks of
``chunk_len`` tokens (at least the longest curriculum sequence length). Each epoch shuffles the chunk
order with ``seed + epoch``; rank r takes every ``world_size``-th chunk of that order (disjoint
samples); each chunk is read front to back in windows of ``seq_len`` tokens (plus one look-ahead
token for the last target). So any sequence length reads the same token stream in the same order:
``set_seq_len`` switches the context-length curriculum mid-run without re-packing, and the state
``(epoch, chunk, offset)`` resumes at the exact next sample.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm_pipeline.data.manifest import MANIFEST

IGNORE_INDEX = -100


class PackedTokenDataset:
    """Random access to one split of a packed dataset: tokens, document ids and loss mask by position."""

    def __init__(self, root: str | os.PathLike[str], split: str = "train"):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"{mpath} not found: run `llm-pipeline data pack` (or `data prepare`) first")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{mpath}: unreadable manifest ({e}); run `llm-pipeline data pack` again") from None
        if not isinstance(self.manifest, dict) or not isinstance(self.manifest.get("splits"), dict):
            step = self.manifest.get("step") if isinstance(self.manifest, dict) else None
            made_by = f"the '{step}' step's manifest" if step else "not a packed-data manifest"
            raise ValueError(
                f"{self.root} does not hold packed token shards ({mpath.name} is {made_by}); point data.path at "
                f"the packed/ folder that `llm-pipeline data pack` writes (e.g. <data output_dir>/packed)"
            )
        if split not in self.manifest["splits"]:
            raise ValueError(f"{self.root}: no split {split!r}; has {sorted(self.manifest['splits'])}")
        self.split = split
        shards = self.manifest["splits"][split]["shards"]
        if not shards:
            raise ValueError(f"{self.root}: split {split!r} is empty")
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self._tokens: list[np.memmap] = []
        self._loss: list[np.memmap | None] = []
        ends: list[np.ndarray] = []
        offset = 0
        for s in shards:
            path = self.root / s["path"]
            toks = np.memmap(path, dtype=dtype, mode="r")
            index = np.fromfile(f"{path}.index", dtype="<u8").astype(np.int64)
            if len(index) == 0 or index[-1] != len(toks):
                raise ValueError(f"{path}: index does not match the token file (corrupt or partial shard)")
            loss = Path(f"{path}.loss")
            self._tokens.append(toks)
            self._loss.append(np.memmap(loss, dtype=np.uint8, mode="r") if loss.is_file() else None)
            ends.append(index + offset)
            offset += len(toks)
        self._shard_starts = np.array([0, *np.cumsum([len(t) for t in self._tokens])], dtype=np.int64)
        self.doc_ends = np.concatenate(ends)  # global end offset of each document
        self.num_tokens = int(offset)
        self.has_loss_mask = any(x is not None for x in self._loss)

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def num_documents(self) -> int:
        return len(self.doc_ends)

    def _gather(self, arrays: list[Any], start: int, end: int, dtype: Any, fill: int) -> np.ndarray:
        out = np.empty(end - start, dtype=dtype)
        first = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        pos = start
        for i in range(first, len(arrays)):
            s0, s1 = self._shard_starts[i], self._shard_starts[i + 1]
            if pos >= end:
                break
            take = min(end, s1) - pos
            src = arrays[i]
            out[pos - start : pos - start + take] = fill if src is None else src[pos - s0 : pos - s0 + take]
            pos += take
        return out

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Token ids in [start, end) of the split's stream, as int64."""
        return self._gather(self._tokens, start, end, np.int64, 0)

    def loss_mask(self, start: int, end: int) -> np.ndarray:
        """1 where the token is trained on (all ones without a .loss file)."""
        return self._gather(self._loss, start, end, np.uint8, 1)

    def document_index(self, start: int, end: int) -> np.ndarray:
        """Global document number of every position in [start, end)."""
        return np.searchsorted(self.doc_ends, np.arange(start, end), side="right").astype(np.int64)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (``<|bos|> ... <|eos|>``)."""
        start = int(self.doc_ends[i - 1]) if i else 0
        return self.tokens(start, int(self.doc_ends[i]))


def _window(ds: PackedTokenDataset, start: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, next-token labels and row-local document ids of the ``length``-token span at ``start``."""
    toks = ds.tokens(start, start + length)
    doc = ds.document_index(start, start + length)
    target = toks[1:].copy()
    target[doc[1:] != doc[:-1]] = IGNORE_INDEX  # never predict across a document boundary
    if ds.has_loss_mask:
        target[ds.loss_mask(start + 1, start + length) == 0] = IGNORE_INDEX
    return toks[:-1], target, doc[:-1] - doc[0]


class TokenBatchLoader:
    """Deterministic, resumable, rank-disjoint batches of ``seq_len`` windows from a packed split.

    Batches: ``input_ids`` [B,T], ``labels`` [B,T] (next-token targets; -100 on loss-masked targets and
    on targets in a different document than their input), ``document_ids`` [B,T] (segment number
    within the row; the model restarts positions and masks attention per segment).
    """

    def __init__(
        self,
        dataset: PackedTokenDataset,
        *,
        seq_len: int,
        micro_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        chunk_len: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.dataset = dataset
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.chunk_len = chunk_len or max(8192, seq_len)
        self.num_chunks = (dataset.num_tokens - 1) // self.chunk_len  # +1 look-ahead token always exists
        self.chunks_per_rank = self.num_chunks // world_size
        if self.chunks_per_rank == 0:
            raise ValueError(
                f"split {dataset.split!r} has {dataset.num_tokens} tokens: too few for chunk_len={self.chunk_len} "
                f"x world_size={world_size}; use a smaller chunk_len or more data"
            )
        self.epoch, self.chunk, self.offset = 0, 0, 0
        self._order: np.ndarray | None = None
        self.set_seq_len(seq_len, micro_batch_size)

    def set_seq_len(self, seq_len: int, micro_batch_size: int) -> None:
        """Switch the window length (context-length curriculum); the stream position is kept."""
        if not 0 < seq_len <= self.chunk_len:
            raise ValueError(f"seq_len {seq_len} must be in (0, chunk_len={self.chunk_len}]; set a larger chunk_len")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size

    @property
    def tokens_per_batch(self) -> int:
        return self.seq_len * self.micro_batch_size

    def _rank_chunks(self) -> np.ndarray:
        if self._order is None:
            perm = np.random.default_rng(self.seed + self.epoch).permutation(self.num_chunks)
            self._order = perm[self.rank : self.chunks_per_rank * self.world_size : self.world_size]
        return self._order

    def _next_window(self) -> int:
        """Stream start of the next ``seq_len`` window, advancing the cursor (chunks, epochs)."""
        while True:
            if self.offset + self.seq_len <= self.chunk_len:
                start = int(self._rank_chunks()[self.chunk]) * self.chunk_len + self.offset
                self.offset += self.seq_len
                return start
            self.chunk, self.offset = self.chunk + 1, 0  # the chunk's tail shorter than seq_len is skipped
            if self.chunk >= self.chunks_per_rank:
                self.epoch, self.chunk, self._order = self.epoch + 1, 0, None

    def next_batch(self) -> dict[str, torch.Tensor]:
        b, t = self.micro_batch_size, self.seq_len
        ds = self.dataset
        inputs = np.empty((b, t), np.int64)
        labels = np.empty((b, t), np.int64)
        docs = np.empty((b, t), np.int64)
        for i in range(b):
            inputs[i], labels[i], docs[i] = _window(ds, self._next_window(), t + 1)
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "document_ids": torch.from_numpy(docs),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Position of the next sample (plus what it depends on, checked on load)."""
        return {
            "epoch": self.epoch,
            "chunk": self.chunk,
            "offset": self.offset,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "chunk_len": self.chunk_len,
            "num_tokens": self.dataset.num_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the exact next sample; refuses a state from another dataset or sharding."""
        for key in ("seed", "rank", "world_size", "chunk_len", "num_tokens"):
            mine = self.dataset.num_tokens if key == "num_tokens" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, this loader has {mine}: cannot resume exactly")
        self.epoch, self.chunk, self.offset = int(state["epoch"]), int(state["chunk"]), int(state["offset"])
        self._order = None
        self.set_seq_len(int(state["seq_len"]), int(state["micro_batch_size"]))


def iter_sequential_batches(
    dataset: PackedTokenDataset,
    *,
    seq_len: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    pad_id: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Every token of the split exactly once as a target, in order, no shuffling (evaluation).

    Windows start at 0, T, 2T, ...; rank r takes windows r, r + world_size, ... The last window is
    padded (``pad_id`` inputs, -100 labels, its own document id). Labels follow the same rules as
    :class:`TokenBatchLoader`, so the sum of losses over all ranks covers the split once (the first
    token has no context and is never a target).
    """
    n = dataset.num_tokens
    starts = list(range(0, n - 1, seq_len))[rank::world_size]
    for i in range(0, len(starts), micro_batch_size):
        rows = starts[i : i + micro_batch_size]
        b = len(rows)
        inputs = np.full((b, seq_len), pad_id, np.int64)
        labels = np.full((b, seq_len), IGNORE_INDEX, np.int64)
        docs = np.zeros((b, seq_len), np.int64)
        for r, start in enumerate(rows):
            k = min(seq_len + 1, n - start) - 1
            inputs[r, :k], labels[r, :k], docs[r, :k] = _window(dataset, start, k + 1)
            if k < seq_len:  # padding is a segment of its own
                docs[r, k:] = docs[r, k - 1] + 1
        yield {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "document_ids": torch.from_numpy(docs),
        }
