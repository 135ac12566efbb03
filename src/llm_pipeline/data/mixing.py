"""Weighted mixtures of data sources, row by row: deterministic, resumable, accounted per source.

One mechanism for every stage: pretraining mixes token streams (rows of ``seq_len`` tokens, so a
row share is a token share), SFT and DPO mix example rows (packed SFT rows, preference pairs), and
LoRA's domain/general data is a two-source mixture.

Order. Row ``n`` of a rank's stream goes to the source furthest below its share so far (its deficit
``share·(n+1) - rows drawn``) after adding a uniform [0, 1) jitter per source, drawn from ``(seed,
rank, n // BLOCK)``: the order is random, yet every prefix of the stream is within a couple of rows
of the shares (no sampling noise: a 0.5/0.3/0.2 mixture is at its weights after a few hundred rows,
not after many thousands). The order is a pure function of the seed and the mixture, and the source
of a row depends on its stream position only: a change of micro-batch size (OOM recovery) or of
``seq_len`` (curriculum) changes nothing, and a resumed run needs only the row counter, the counts at
the current block's start and each inner source's own state.
Inner sources are asked for exactly the rows they supply (their micro-batch size is set before
every call), so nothing is buffered.

Accounting. Rows, tokens (non-padding input positions), trained tokens (labels != -100) and
examples (packed SFT segments, preference pairs, token-stream rows) per source, saved with the
state (token streams keep a row's window start aside and settle the counts in arrays when they are
read, every few blocks of rows and at a ``seq_len`` change, so a row costs the mixer an append). A
source that runs out and starts another pass is reported (a warning, unless its ``epochs``/``max_epochs``
allow that many passes; token streams report it when their counts are settled).
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from llm_pipeline.data.loader import IGNORE_INDEX, _window
from llm_pipeline.data.mixture_config import resolve_shares

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
#: Rows per block of draws (the jitter of a block is drawn at once; a checkpoint holds the counts at its start).
BLOCK = 512
#: Rows a token mixture keeps aside at most before settling their counts (a settle costs ~15 array calls).
_SETTLE_ROWS = 4 * BLOCK


class _Source(Protocol):
    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------------------------
# The mixer
# --------------------------------------------------------------------------------------------


def _pad_value(key: str, pad_id: int) -> int | None:
    if key.endswith("input_ids"):
        return pad_id
    if key.endswith("labels"):
        return IGNORE_INDEX
    if key == "document_ids":
        return -1
    if key in ("attention_mask", "position_ids"):
        return 0
    return None


def _source_kind(source: object) -> str:
    if hasattr(source, "set_seq_len"):
        return "tokens"
    if hasattr(source, "set_micro_batch_size"):
        return "rows"
    raise TypeError(f"{type(source).__name__} is not a batch source (no set_seq_len or set_micro_batch_size)")


def batch_counts(batch: Batch) -> dict[str, int]:
    """Rows, tokens (non-padding inputs), trained tokens and examples of one source's micro-batch."""
    first = next(iter(batch.values()))
    rows = int(first.shape[0])
    labels = [v for k, v in batch.items() if k.endswith("labels")]
    trained = sum(int((v != IGNORE_INDEX).sum()) for v in labels)
    docs = batch.get("document_ids")
    if docs is not None:
        tokens = int((docs >= 0).sum())
        examples = int((docs.max(dim=1).values + 1).clamp_min(0).sum()) if docs.ndim == 2 else rows
    else:
        tokens, examples = trained, rows
    if "pair_ids" in batch:
        examples = int((batch["pair_ids"] >= 0).sum())
    return {"rows": rows, "tokens": tokens, "trained_tokens": trained, "examples": examples}


_COUNTS = ("rows", "tokens", "trained_tokens", "examples")


def deficit_order(
    row_weights: np.ndarray, counts: np.ndarray, seed: int, rank: int, block: int
) -> tuple[np.ndarray, np.ndarray]:
    """Source of each row of ``block`` and the counts after it, from the counts at its start.

    Row ``n`` (1-based in the stream) goes to the source with the largest ``weight·n - count + jitter``
    (jitter uniform [0, 1), drawn from ``(seed, rank, block)`` for every source, live or not), the first
    such source on a tie. The recurrence is sequential (each row's counts depend on every earlier row's
    choice), so it stays one loop over plain floats, in exactly this arithmetic (a checkpoint's order
    depends on it bit for bit). Two or three live sources, the common mixtures, go through
    :func:`_deficit_loop3`, which unrolls the comparisons (well under half the generic loop's time; either
    runs once per block of rows).
    """
    order, after, _ = _deficit_draw(row_weights, counts, seed, rank, block)
    return order, after


def _deficit_draw(
    row_weights: np.ndarray, counts: np.ndarray, seed: int, rank: int, block: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """:func:`deficit_order`, plus the order as a list of ints (what the mixer slices per micro-batch): the
    loop's own list where every source is live, so the order is not converted back and forth."""
    k = len(row_weights)
    jitter = np.random.default_rng([seed, rank, block]).random((BLOCK, k))
    live = np.flatnonzero(row_weights > 0)  # a source of share 0 is never drawn
    after = np.array(counts, np.int64)
    if len(live) == 1:
        after[live[0]] += BLOCK
        return np.full(BLOCK, live[0], np.int64), after, [int(live[0])] * BLOCK
    weights = row_weights[live].tolist()
    jit = jitter if len(live) == k else jitter[:, live]
    c = after[live].tolist()
    if len(live) <= 3:
        out = _deficit_loop3(weights, block * BLOCK, jit, c)
        order = np.frombuffer(bytes(out), np.uint8).astype(np.int64)  # 0..2: bytes() packs them in one C loop
    else:
        out = []
        sources = range(len(weights))
        n = block * BLOCK
        for u in jit.tolist():
            n += 1
            best, top = 0, -math.inf
            for i in sources:
                score = weights[i] * n - c[i] + u[i]
                if score > top:
                    best, top = i, score
            c[best] += 1
            out.append(best)
        order = np.fromiter(out, np.int64, count=BLOCK)  # (np.array would inspect every element for its type)
    after[live] = c[: len(live)]
    if len(live) == k:
        return order, after, out
    order = live[order]
    return order, after, order.tolist()


def _deficit_loop3(weights: list[float], rows_before: int, jitter: np.ndarray, counts: list[int]) -> list[int]:
    """:func:`deficit_order`'s loop for two or three live sources, its comparisons unrolled: the same scores
    (the row number and the counts held as floats, exact below 2**53, so ``w·n - c`` are the same product and
    subtraction) and the same first-on-a-tie choice; a missing third source scores -inf, never chosen.
    ``counts`` is updated."""
    if len(weights) == 2:
        weights, counts[:] = [*weights, -math.inf], [*counts, 0]
        jitter = np.hstack([jitter, np.zeros((len(jitter), 1))])
    w0, w1, w2 = weights
    c0, c1, c2 = map(float, counts)
    n = float(rows_before)
    out: list[int] = []
    push = out.append
    flat = iter(jitter.ravel().tolist())  # one flat list: no list per row to build and free
    for u0, u1, u2 in zip(flat, flat, flat, strict=True):
        n += 1.0
        s0, s1, s2 = w0 * n - c0 + u0, w1 * n - c1 + u1, w2 * n - c2 + u2
        if s0 >= s1 and s0 >= s2:
            c0 += 1.0
            push(0)
        elif s1 >= s2:
            c1 += 1.0
            push(1)
        else:
            c2 += 1.0
            push(2)
    counts[:] = [int(c0), int(c1), int(c2)]
    return out


class WeightedMixture:
    """Rows from several named sources at set shares (see the module docstring).

    ``shares`` are the shares of ``unit`` (``tokens``: token streams; ``examples``: row sources, whose
    row shares are the example shares divided by each source's mean examples per row; ``rows``: row
    sources drawn by row, as LoRA's chat data is). A source of
    share 0 is never drawn (it may still be evaluated). Constructing it returns a
    :class:`TokenMixture` (inner sources have ``set_seq_len``) or a :class:`RowMixture`
    (``set_micro_batch_size``). Rows of different widths are right-padded to the batch's widest row.
    """

    def __new__(cls, sources: Mapping[str, _Source], shares: Mapping[str, float], **kwargs: Any) -> WeightedMixture:
        if cls is WeightedMixture:
            kinds = {name: _source_kind(s) for name, s in sources.items()}
            if len(set(kinds.values())) != 1:
                raise TypeError(f"mixture sources must all be token streams or all row sources, got {kinds}")
            cls = TokenMixture if set(kinds.values()) == {"tokens"} else RowMixture
        return super().__new__(cls)

    def __init__(
        self,
        sources: Mapping[str, _Source],
        shares: Mapping[str, float],
        *,
        unit: Literal["tokens", "examples", "rows"] = "tokens",
        seed: int = 0,
        rank: int = 0,
        pad_id: int = 0,
        allowed_epochs: Mapping[str, float | None] | None = None,
        max_epochs: Mapping[str, float | None] | None = None,
    ) -> None:
        if not sources:
            raise ValueError("a mixture needs at least one source")
        if set(shares) != set(sources):
            raise ValueError(f"shares for {sorted(shares)} but sources {sorted(sources)}")
        bad = {n: w for n, w in shares.items() if not math.isfinite(w) or w < 0}
        if bad:
            raise ValueError(f"negative or non-finite mixture share(s): {bad}")
        self.names = list(sources)
        self.sources = dict(sources)
        total = sum(shares.values())
        if total <= 0:
            raise ValueError(f"every mixture share is zero ({', '.join(self.names)})")
        self.shares = {n: float(shares[n]) / total for n in self.names}
        self.unit, self.seed, self.rank, self.pad_id = unit, int(seed), int(rank), pad_id
        self.allowed_epochs = dict(allowed_epochs or {})  # passes that are no surprise (epochs or max_epochs)
        self.max_epochs = dict(max_epochs or {})  # caps on passes (check_planned_epochs)
        row_w = np.array([self.shares[n] / self._examples_per_row(n) for n in self.names], dtype=np.float64)
        self.row_weights = row_w / row_w.sum()
        self.micro_batch_size: int | None = None
        self.rows_drawn = 0
        self._quota = np.zeros(len(self.names), np.int64)  # deficit counts at the start of block _quota_block
        self._quota_block = 0
        # the current block: its number, its order (array and list) and the counts after it
        self._block_cache: tuple[int, np.ndarray, np.ndarray, list[int]] | None = None
        self._counts = {n: dict.fromkeys(_COUNTS, 0) for n in self.names}
        self._passes = dict.fromkeys(self.names, 0)  # highest epoch seen of each source (0 = first pass)

    def _examples_per_row(self, name: str) -> float:
        if self.unit != "examples":
            return 1.0
        per_row = getattr(self.sources[name], "mean_examples_per_row", None)
        return float(per_row) if per_row else 1.0

    # ---- the order -----------------------------------------------------------------------------

    def _deficit_block(self, counts: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Source of each row of ``block`` (array and list), and the counts after it (see :func:`deficit_order`)."""
        return _deficit_draw(self.row_weights, counts, self.seed, self.rank, block)

    def _block(self, block: int) -> np.ndarray:
        cache = self._block_cache
        if cache is not None and cache[0] == block:
            return cache[1]
        if block < self._quota_block:
            raise RuntimeError(f"mixture block {block} is behind the stream (at block {self._quota_block})")
        while self._quota_block < block:  # the counts after the cached block: each block is drawn once, not twice
            after = cache[2] if cache is not None and cache[0] == self._quota_block else None
            self._quota = after if after is not None else self._deficit_block(self._quota, self._quota_block)[1]
            self._quota_block += 1
        order, after, listed = self._deficit_block(self._quota, block)
        self._block_cache = (block, order, after, listed)
        return order

    def _source_list(self, start: int, count: int) -> list[int]:
        """:meth:`source_of_rows` as a list of ints (a slice of the cached block's list when in one block)."""
        offset = start % BLOCK
        if offset + count <= BLOCK:
            block = start // BLOCK
            cache = self._block_cache
            if cache is None or cache[0] != block:
                self._block(block)
                cache = self._block_cache
            return cache[3][offset : offset + count]  # type: ignore[index]
        return self.source_of_rows(start, count).tolist()

    def source_of_rows(self, start: int, count: int) -> np.ndarray:
        """Index (into ``names``) of the source of rows ``start .. start+count-1`` of this rank's stream."""
        first, last = start // BLOCK, (start + count - 1) // BLOCK
        if first == last:
            return self._block(first)[start % BLOCK : start % BLOCK + count]
        blocks = np.concatenate([self._block(b) for b in range(first, last + 1)])
        return blocks[start - first * BLOCK : start - first * BLOCK + count]

    # ---- batches -------------------------------------------------------------------------------

    def _request(self, source: _Source, rows: int) -> None:
        raise NotImplementedError

    def next_batch(self) -> Batch:
        if self.micro_batch_size is None:
            raise RuntimeError("set the micro-batch size (set_seq_len / set_micro_batch_size) before next_batch")
        b = self.micro_batch_size
        which = self.source_of_rows(self.rows_drawn, b)
        self.rows_drawn += b
        parts: list[tuple[Batch, np.ndarray]] = []
        for i, name in enumerate(self.names):
            where = which == i
            rows = int(where.sum())
            if rows == 0:
                continue
            source = self.sources[name]
            self._request(source, rows)
            batch = source.next_batch()
            got = {t.shape[0] for t in batch.values()}
            if got != {rows}:
                raise ValueError(f"mixture source {name!r} returned {sorted(got)} rows for a request of {rows}")
            for k, v in self._batch_counts(batch).items():
                self._counts[name][k] += v
            self._note_pass(name)
            parts.append((batch, where))
        return self._combine(parts, b)

    def _batch_counts(self, batch: Batch) -> dict[str, int]:
        return batch_counts(batch)

    def _note_pass(self, name: str) -> None:
        epoch = int(getattr(self.sources[name], "epoch", 0))
        if epoch <= self._passes[name]:
            return
        self._passes[name] = epoch
        allowed = self.allowed_epochs.get(name)
        if self.rank != 0:
            return
        if allowed is not None and epoch < allowed:
            log.info("mixture source %r: pass %d of up to %g (upsampled as configured)", name, epoch + 1, allowed)
        else:
            self._settle()  # the message quotes the count
            log.warning(
                "mixture source %r ran out and is repeated: pass %d over its data (after %d %s from it); set its "
                "epochs/max_epochs to make the upsampling explicit, or give it more data or a smaller share",
                name, epoch + 1, self._counts[name][self.unit], self.unit,
            )  # fmt: skip

    def _combine(self, parts: list[tuple[Batch, np.ndarray]], rows: int) -> Batch:
        keys = set(parts[0][0])
        if any(set(p) != keys for p, _ in parts):
            raise ValueError(f"mixture sources give batches with different fields: {[sorted(p) for p, _ in parts]}")
        if len(parts) == 1:
            return parts[0][0]
        widths = [t.shape[1] for p, _ in parts for t in p.values() if t.ndim >= 2]
        width = max(widths) if widths else 0
        # the sources' rows one after the other, then each put back at its place in the micro-batch
        order = torch.from_numpy(np.argsort(np.concatenate([np.flatnonzero(w) for _, w in parts]), kind="stable"))
        return {
            key: torch.cat([self._padded(batch[key], key, width) for batch, _ in parts]).index_select(0, order)
            for key in parts[0][0]
        }

    def _padded(self, t: torch.Tensor, key: str, width: int) -> torch.Tensor:
        if t.ndim < 2 or t.shape[1] == width:
            return t
        value = _pad_value(key, self.pad_id)
        if value is None:
            raise ValueError(f"rows of different widths and no pad value for field {key!r}")
        return F.pad(t, [0, 0] * (t.ndim - 2) + [0, width - t.shape[1]], value=value)

    # ---- accounting ------------------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows, tokens, trained tokens and examples drawn from each source so far (this rank)."""
        self._settle()
        return {n: dict(c) for n, c in self._counts.items()}

    def _settle(self) -> None:
        """Fold counts kept aside for speed into ``_counts`` (:class:`TokenMixture`); here they are always there."""

    def passes(self) -> dict[str, int]:
        """Passes begun over each source (1 = still in its first)."""
        self._settle()
        return {n: p + 1 for n, p in self._passes.items()}

    def stats(self) -> dict[str, float]:
        """Flat per-source counts and realised shares (of ``unit``) against the configured shares."""
        return mixture_stats(self.counts(), self.shares, self.unit)

    # ---- state -----------------------------------------------------------------------------------

    def _own_state(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Row counter, apportionment position, per-source counts and every inner source's state."""
        return {
            "kind": "mixture",
            "names": list(self.names),
            "shares": dict(self.shares),
            "seed": self.seed,
            "rank": self.rank,
            "rows_drawn": self.rows_drawn,
            "micro_batch_size": self.micro_batch_size,
            "quota": [int(x) for x in self._quota],
            "quota_block": self._quota_block,
            "counts": self.counts(),
            "passes": dict(self._passes),
            "sources": {n: s.state_dict() for n, s in self.sources.items()},
            **self._own_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the exact next row; refuses a state of another mixture, seed or rank."""
        if state.get("kind") != "mixture":
            if "domain_rows" in state.get("counts", {}):  # MixedBatchSource (LoRA's domain/general mixer until 19)
                raise ValueError(
                    "the checkpoint's loader state comes from the older two-source domain/general mixer (a LoRA "
                    "run started before weighted data mixtures), whose stream this mixer cannot continue: restart "
                    "the stage (set its checkpoint-* folders aside, or use another training.output_dir), or finish "
                    "the run with the version that started it"
                )
            raise ValueError("the loader state is not a mixture's: the run was started with a single data source")
        for key, mine in (("names", self.names), ("seed", self.seed), ("rank", self.rank)):
            if state[key] != mine:
                raise ValueError(
                    f"mixture state has {key}={state[key]}, this mixture has {mine}: cannot resume exactly"
                )
        theirs = state["shares"]
        if any(not math.isclose(theirs[n], self.shares[n], rel_tol=1e-9, abs_tol=1e-12) for n in self.names):
            raise ValueError(f"mixture state has shares {theirs}, this mixture {self.shares}: cannot resume exactly")
        for n, s in self.sources.items():
            s.load_state_dict(state["sources"][n])
        self.rows_drawn = int(state["rows_drawn"])
        self.micro_batch_size = state["micro_batch_size"]
        self._quota = np.array(state["quota"], np.int64)
        self._quota_block = int(state["quota_block"])
        self._block_cache = None
        self._counts = {n: {k: int(v) for k, v in state["counts"][n].items()} for n in self.names}
        self._passes = {n: int(v) for n, v in state["passes"].items()}


class TokenMixture(WeightedMixture):
    """A mixture of token streams (e.g. ``TokenBatchLoader``s): every row is ``seq_len`` tokens.

    Inner ``TokenBatchLoader``s (the fast path): a row costs the mixer an append of its window's start;
    the rows' counts and the sources' passes are settled (:meth:`_settle`) when read (a training run reads
    them every step), when ``seq_len`` changes and every ``_SETTLE_ROWS`` rows, in a few array operations
    per source rather than Python work per batch.
    """

    seq_len: int | None = None

    def __init__(self, sources: Mapping[str, _Source], shares: Mapping[str, float], **kwargs: Any) -> None:
        super().__init__(sources, shares, **kwargs)
        loaders = [self.sources[n] for n in self.names]
        # inner TokenBatchLoaders: rows are cut straight into the batch (else each source's batches are merged)
        self._loaders: list[Any] | None = loaders if all(hasattr(s, "_next_window") for s in loaders) else None
        self._derived_trained = [_trained_from_documents(getattr(s, "dataset", None)) for s in loaders]
        self._counted = [i for i, derived in enumerate(self._derived_trained) if not derived]
        # the fast path's per-row calls, bound once: a row costs the mixer what a single loader's row costs it
        self._next_windows = [s._next_window for s in loaders] if self._loaders is not None else []
        self._datasets = [s.dataset for s in loaders] if self._loaders is not None else []
        self._recent: dict[int, np.ndarray] = {}  # orders of the blocks since the last settle (their sources)
        self._clear_pending()

    def _clear_pending(self) -> None:
        """Rows drawn since the counts were last settled: their window starts, in stream order (their sources are
        the orders of the blocks they are in), and the untrained targets of sources whose trained tokens are
        counted, not derived."""
        self._pending_starts: list[int] = []
        self._pending_ignored = [0] * len(self.names)
        self._settled_at = self.rows_drawn
        first = self._settled_at // BLOCK
        self._recent = {b: order for b, order in self._recent.items() if b >= first}

    def _block(self, block: int) -> np.ndarray:
        order = super()._block(block)
        if self._loaders is not None:  # the fast path: its rows' sources, when their counts are settled (pruned then)
            self._recent[block] = order
        return order

    def set_seq_len(self, seq_len: int, micro_batch_size: int) -> None:
        """Window length and rows per micro-batch, as the trainer sets them (curriculum, OOM fallback)."""
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if seq_len != self.seq_len:
            self._settle()  # the pending rows are windows of the old length
            for loader in self._loaders or ():
                loader.set_seq_len(seq_len, 1)  # the fast path asks each for one window at a time
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size

    def _request(self, source: _Source, rows: int) -> None:
        source.set_seq_len(self.seq_len, rows)  # type: ignore[attr-defined]

    def next_batch(self) -> Batch:
        """Inner ``TokenBatchLoader``s: each row's window is cut straight into the batch (the very rows their
        own ``next_batch`` would give, without building and merging one batch per source)."""
        if self.micro_batch_size is None or self.seq_len is None:
            raise RuntimeError("set the micro-batch size (set_seq_len) before next_batch")
        if self._loaders is None:
            return super().next_batch()
        b, t = self.micro_batch_size, self.seq_len
        first = self.rows_drawn
        offset = first % BLOCK
        cache = self._block_cache
        if offset + b <= BLOCK and cache is not None and cache[0] == first // BLOCK:
            which = cache[3][offset : offset + b]  # (what _source_list does, without the call)
        else:
            which = self._source_list(first, b)
        self.rows_drawn = first + b
        inputs = np.empty((b, t), np.int64)
        labels = np.empty((b, t), np.int64)
        docs = np.empty((b, t), np.int64)
        keep = self._pending_starts.append
        next_windows, datasets = self._next_windows, self._datasets
        for r, i in enumerate(which):
            start = next_windows[i]()
            inputs[r], labels[r], docs[r] = _window(datasets[i], start, t + 1)
            keep(start)
        for i in self._counted:  # a loss mask or an empty document: the labels are counted
            mine = [r for r, j in enumerate(which) if j == i]
            if mine:
                self._pending_ignored[i] += int(np.count_nonzero(labels[mine] == IGNORE_INDEX))
        if self.rows_drawn - self._settled_at >= _SETTLE_ROWS:
            self._settle()  # keeps the pending starts short
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                "document_ids": torch.from_numpy(docs)}  # fmt: skip

    def _settle(self) -> None:
        """Fold the pending rows into the counts. A source whose trained tokens follow from its document ids
        (see :func:`_trained_from_documents`) has, in the row at ``start``, one untrained target per document
        boundary among its targets: ``doc(start + seq_len) - doc(start)``, two searches over its starts."""
        n = len(self._pending_starts)
        if not n:
            return
        t, at = self.seq_len or 0, self._settled_at
        first, last = at // BLOCK, (at + n - 1) // BLOCK
        orders = (
            self._recent[first] if first == last else np.concatenate([self._recent[b] for b in range(first, last + 1)])
        )
        sources = orders[at - first * BLOCK : at - first * BLOCK + n]
        starts = np.frombuffer(struct.pack(f"{n}q", *self._pending_starts), np.int64)  # (half fromiter's cost)
        per_source = np.bincount(sources, minlength=len(self.names)).tolist()
        for i, (name, rows) in enumerate(zip(self.names, per_source, strict=True)):
            if not rows:
                continue
            ignored = self._pending_ignored[i]
            if self._derived_trained[i]:
                ends = self.sources[name].dataset.doc_ends  # type: ignore[attr-defined]
                at = starts if rows == n else starts[sources == i]
                ignored = int(np.searchsorted(ends, at + t, "right").sum() - np.searchsorted(ends, at, "right").sum())
            c = self._counts[name]
            c["rows"] += rows
            c["tokens"] += rows * t
            c["trained_tokens"] += rows * t - ignored
            c["examples"] += rows
        self._clear_pending()
        for name, rows in zip(self.names, per_source, strict=True):
            if rows:
                self._note_pass(name)  # a source that began another pass is reported here, with the counts

    def _batch_counts(self, batch: Batch) -> dict[str, int]:
        """Token-stream rows are whole windows: every position a token, every row one example's span."""
        ids = batch["input_ids"]
        trained = int(torch.count_nonzero(batch["labels"] != IGNORE_INDEX)) if "labels" in batch else ids.numel()
        return {"rows": ids.shape[0], "tokens": ids.numel(), "trained_tokens": trained, "examples": ids.shape[0]}

    def _own_state(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seq_len = state["seq_len"]
        self._recent = {}
        self._clear_pending()
        if self.seq_len is not None:
            for loader in self._loaders or ():
                loader.set_seq_len(self.seq_len, 1)  # a source unused since a seq_len change may hold the old one

    @property
    def dataset(self) -> Any:
        """The first source's dataset (its manifest: vocabulary, tokenizer), as a single loader has."""
        return getattr(self.sources[self.names[0]], "dataset", None)


def _trained_from_documents(dataset: Any) -> bool:
    """Whether a token stream's trained targets follow from its rows' document ids (see ``TokenMixture._settle``):
    no loss mask, and every document at least one token long (document ids step by at most one)."""
    ends = getattr(dataset, "doc_ends", None)
    if ends is None or getattr(dataset, "has_loss_mask", True):
        return False
    if len(ends) and ends[0] <= 0:
        return False
    step = 1 << 20  # in slices: a large corpus has many millions of documents
    for i in range(0, len(ends) - 1, step):
        j = min(i + step, len(ends) - 1)
        if not np.all(ends[i + 1 : j + 1] > ends[i:j]):
            return False
    return True


class RowMixture(WeightedMixture):
    """A mixture of row sources (packed or padded examples, preference pairs)."""

    def set_micro_batch_size(self, rows: int) -> None:
        """Rows per micro-batch, as the trainer sets them."""
        if rows <= 0:
            raise ValueError(f"micro-batch size must be positive, got {rows}")
        self.micro_batch_size = rows

    def _request(self, source: _Source, rows: int) -> None:
        source.set_micro_batch_size(rows)  # type: ignore[attr-defined]

    @property
    def rows_per_epoch(self) -> int:
        """Rows of one pass over every source with a share (``training.num_epochs`` counts these)."""
        return sum(int(getattr(self.sources[n], "rows_per_epoch", 0)) for n in self.names if self.shares[n] > 0)


def mixture_stats(
    counts: Mapping[str, Mapping[str, float]], shares: Mapping[str, float], unit: str
) -> dict[str, float]:
    """``mix/<source>/<count>``, ``mix/<source>/share`` (realised share of ``unit``) and ``mix/<source>/weight``."""
    key = unit  # "tokens", "examples" or "rows": each is also a count
    total = sum(c[key] for c in counts.values())
    out: dict[str, float] = {}
    for name, c in counts.items():
        out.update({f"mix/{name}/{k}": float(v) for k, v in c.items()})
        out[f"mix/{name}/share"] = c[key] / total if total else 0.0
        out[f"mix/{name}/weight"] = float(shares[name])
    return out


class SourceSet:
    """Held-out data of a mixture: one finite source per name, and how their losses combine into ``loss``.

    The evaluator logs each as ``<name>/loss`` (``eval/<name>/loss`` in the trackers); ``loss`` itself
    is the shares-weighted mean of the sources' (``primary`` None) or one source's, unless ``combine`` (a
    stage's own rule, e.g. RL's accuracy over the sources its accuracy reward scores) makes the overall
    metrics from every source's metrics and units evaluated.
    """

    def __init__(
        self,
        sources: Mapping[str, Any],
        shares: Mapping[str, float],
        primary: str | None = None,
        combine: Callable[[Mapping[str, Mapping[str, float]], Mapping[str, float]], dict[str, float]] | None = None,
    ) -> None:
        if not sources:
            raise ValueError("a SourceSet needs at least one source")
        self.sources, self.primary, self.combine = dict(sources), primary, combine
        self.shares = {n: float(shares.get(n, 0.0)) for n in sources}

    # A SourceSet stands where a validation source goes; the evaluator expands it. These make it one.
    def next_batch(self) -> Batch:
        raise TypeError("a SourceSet is evaluated source by source (train.evaluation.Evaluator)")

    def state_dict(self) -> dict[str, Any]:
        return {n: s.state_dict() for n, s in self.sources.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, s in self.sources.items():
            s.load_state_dict(state[n])


# --------------------------------------------------------------------------------------------
# Building a stage's mixture
# --------------------------------------------------------------------------------------------


def build_mixture(
    data: Any,
    build: Callable[[str, Any], tuple[Any, Any | None]],
    *,
    unit: Literal["tokens", "examples", "rows"],
    seed: int,
    rank: int,
    pad_id: int = 0,
) -> tuple[WeightedMixture, SourceSet | None]:
    """The train mixture and held-out :class:`SourceSet` of ``data.sources`` (a section with ``MixtureFields``).

    ``build(name, cfg)`` makes one source's ``(train, val or None)`` from its own data section; any error
    it raises is re-raised naming the source. The mixer carries each source's ``max_epochs``: the runner
    checks the planned passes against them once the run's length is known
    (:func:`~llm_pipeline.train.mixture.check_mixture_plan`, every stage, before anything trains).
    """
    entries = data.mixture_weights()
    configs = data.source_configs()
    trains: dict[str, Any] = {}
    vals: dict[str, Any] = {}
    for name, cfg in configs.items():
        try:
            train, val = build(name, cfg)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            raise type(e)(f"data source {name!r}: {e}") from None
        trains[name], vals[name] = train, val
    check_same_tokenizer(trains)
    pad_id = int(getattr(next(iter(trains.values())), "pad_id", pad_id))
    sizes = {n: _epoch_size(s, unit) for n, s in trains.items()}
    shares = resolve_shares(entries, sizes, data.budget_key)
    allowed = {n: e.max_epochs or e.epochs for n, e in entries.items()}
    caps = {n: e.max_epochs for n, e in entries.items()}
    mixer = WeightedMixture(
        trains, shares, unit=unit, seed=seed, rank=rank, pad_id=pad_id, allowed_epochs=allowed, max_epochs=caps
    )
    held_out = {n: v for n, v in vals.items() if v is not None}
    primary = data.eval_primary()
    if primary is not None and primary not in held_out:
        if data.sources:
            raise ValueError(f"data.eval_loss names {primary!r}, which has no held-out split")
        held_out = {}  # a two-source LoRA config whose domain has no held-out split: no validation, as before
    return mixer, (SourceSet(held_out, shares, primary) if held_out else None)


def _epoch_size(source: Any, unit: str) -> float:
    """One pass over a source in the unit its share is of, over all ranks: an ``epochs`` budget is this times
    its epochs. Examples for an example mixture (rows x mean examples per row, the very factor the mixer
    divides the share by again, so ``epochs: 1`` everywhere is a concatenation whatever each source's packing
    density), tokens for token streams, rows otherwise."""
    per_row = getattr(source, "mean_examples_per_row", None) if unit == "examples" else None
    return _pass_size(source) * (float(per_row) if per_row else 1.0)


def _pass_size(source: Any) -> float:
    """One pass over a source in what a run is counted in: rows (row sources) or tokens (token streams)."""
    if hasattr(source, "rows_per_epoch"):
        return float(source.rows_per_epoch)
    dataset = getattr(source, "dataset", None)
    return float(dataset.num_tokens) if dataset is not None else 1.0


def planned_epochs(mixer: WeightedMixture, run_size: float) -> dict[str, float]:
    """Passes over each source that a run of ``run_size`` rows (row sources) or tokens draws."""
    return {
        n: float(mixer.row_weights[i]) * run_size / max(_pass_size(mixer.sources[n]), 1.0)
        for i, n in enumerate(mixer.names)
    }


#: Passes a run may make over a source beyond its ``max_epochs``, as a fraction of the cap: budgets are usually
#: published example counts, a little off what cleaning and the held-out split leave of each source.
CAP_MARGIN = 0.01


def check_planned_epochs(
    mixer: WeightedMixture, run_size: float, rank: int, *, step: float = 0.0, num_epochs: float | None = None
) -> None:
    """Refuse a run that passes over a source more often than its ``max_epochs``; log the plan, warn on repeats.

    ``run_size`` and ``step`` (one optimizer step) are rows for row sources, tokens for token streams, over
    every rank. A cap is exceeded by more than :data:`CAP_MARGIN` of it plus the source's part of the last step
    (``training.num_epochs`` rounds the run up to whole steps). Passes up to ``num_epochs`` (the run's own
    repeats) are not warned about.
    """
    planned = planned_epochs(mixer, run_size)
    last = planned_epochs(mixer, step)
    for n, p in planned.items():
        cap = mixer.max_epochs.get(n)
        if cap is not None and p > cap * (1 + CAP_MARGIN) + last[n] + 1e-9:
            raise ValueError(
                f"data source {n!r}: the run would pass over it {p:.2f} times, more than its max_epochs {cap:g}; "
                "lower its share, train fewer steps (training.max_steps / num_epochs) or raise max_epochs"
            )
    if rank == 0:
        log.info(
            "data mixture: %s",
            ", ".join(f"{n} {mixer.shares[n]:.1%} ({planned[n]:.2f} passes)" for n in mixer.names),
        )
        for n, p in planned.items():
            allowed = max(mixer.allowed_epochs.get(n) or 0.0, num_epochs or 0.0) or None
            if p > 1.0 + last[n] and (allowed is None or p > allowed * (1 + CAP_MARGIN) + last[n] + 1e-9):
                log.warning(
                    "data source %r will be repeated: the run draws %.2f passes over it (upsampled); set its epochs or "
                    "max_epochs to make that explicit", n, p,
                )  # fmt: skip


def check_same_tokenizer(sources: Mapping[str, Any]) -> None:
    """Token shards of one mixture must share a tokenizer: the first two that differ are named."""
    seen: dict[str, tuple[str, str]] = {}
    for name, src in sources.items():
        manifest = getattr(getattr(src, "dataset", None), "manifest", None) or {}
        sha = manifest.get("tokenizer_sha256")
        if sha is None:
            continue
        for other, (their_sha, _) in seen.items():
            if their_sha != sha:
                raise ValueError(
                    f"data sources {other!r} and {name!r} were tokenized with different tokenizers (tokenizer.json "
                    f"sha256 {their_sha[:12]}... vs {sha[:12]}...): pack every source with the same tokenizer"
                )
        seen[name] = (sha, str(getattr(src.dataset, "root", "")))
