"""Domain + general data at a fixed ratio, mixed row by row, deterministic and resumable.

Each row of a micro-batch comes from the domain source with probability ``domain_fraction``, else
from the general source. The draw for the n-th row of this rank's stream is a pure function of
``(seed, rank, n)`` (numpy's ``SeedSequence`` hash of that counter), so it depends neither on the
micro-batch size nor on what happened before: a resumed run only needs the row counter, and an
OOM-halved micro-batch sees the same domain/general pattern. The inner sources are asked for
exactly the rows they supply (their micro-batch size is set before every call), so nothing is
buffered and each inner source's own state resumes it exactly.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from llm_pipeline.data.loader import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


class _Source(Protocol):
    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def row_uniforms(seed: int, rank: int, start: int, count: int) -> np.ndarray:
    """Uniform [0, 1) draws for rows ``start .. start+count-1`` of a rank's stream (counter-based)."""
    words = [
        np.random.SeedSequence([seed, rank, n]).generate_state(1, np.uint64)[0] for n in range(start, start + count)
    ]
    return (np.array(words, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _source_kind(source: object) -> str:
    if hasattr(source, "set_seq_len"):
        return "tokens"
    if hasattr(source, "set_micro_batch_size"):
        return "rows"
    raise TypeError(f"{type(source).__name__} is not a batch source (no set_seq_len or set_micro_batch_size)")


class MixedBatchSource:
    """Rows from ``domain`` with probability ``domain_fraction``, else from ``general``.

    Constructing it returns a :class:`MixedTokenSource` (for token sources: ``set_seq_len``) or a
    :class:`MixedRowSource` (for row sources: ``set_micro_batch_size``), the protocol of its inner
    sources. Rows of different widths are right-padded to the batch's widest row: ``input_ids`` with
    ``pad_id``, ``labels`` with -100, ``document_ids`` with -1 (``attention_mask``, ``position_ids``: 0).
    """

    def __new__(cls, domain: _Source, general: _Source, **kwargs: Any) -> MixedBatchSource:
        if cls is MixedBatchSource:
            kinds = {_source_kind(domain), _source_kind(general)}
            if len(kinds) != 1:
                raise TypeError("domain and general sources must be of the same kind (both token or both row sources)")
            cls = MixedTokenSource if kinds == {"tokens"} else MixedRowSource
        return super().__new__(cls)

    def __init__(
        self,
        domain: _Source,
        general: _Source,
        *,
        domain_fraction: float = 0.8,
        seed: int = 0,
        rank: int = 0,
        pad_id: int = 0,
    ) -> None:
        if not 0.0 <= domain_fraction <= 1.0:
            raise ValueError(f"domain_fraction must be in [0, 1], got {domain_fraction}")
        self.domain, self.general = domain, general
        self.domain_fraction, self.seed, self.rank = float(domain_fraction), seed, rank
        self.pad_values = {"input_ids": pad_id, "labels": IGNORE_INDEX, "document_ids": -1}
        self.pad_values.update(attention_mask=0, position_ids=0)
        self.micro_batch_size: int | None = None
        self.rows_drawn = 0  # rows handed out so far: the counter of the next draw
        self._counts = {"domain_rows": 0, "general_rows": 0, "domain_tokens": 0, "general_tokens": 0}

    # What the two kinds differ in: how an inner source is asked for ``rows`` rows.
    def _request(self, source: _Source, rows: int) -> None:
        raise NotImplementedError

    def next_batch(self) -> Batch:
        if self.micro_batch_size is None:
            raise RuntimeError("set the micro-batch size (set_seq_len / set_micro_batch_size) before next_batch")
        b = self.micro_batch_size
        from_domain = row_uniforms(self.seed, self.rank, self.rows_drawn, b) < self.domain_fraction
        self.rows_drawn += b
        n_dom = int(from_domain.sum())
        parts: list[tuple[Batch, np.ndarray]] = []
        for name, source, rows, where in (
            ("domain", self.domain, n_dom, from_domain),
            ("general", self.general, b - n_dom, ~from_domain),
        ):
            if rows == 0:
                continue
            self._request(source, rows)
            batch = source.next_batch()
            got = {t.shape[0] for t in batch.values()}
            if got != {rows}:
                raise ValueError(f"the {name} source returned {sorted(got)} rows for a request of {rows}")
            self._counts[f"{name}_rows"] += rows
            if "labels" in batch:
                self._counts[f"{name}_tokens"] += int((batch["labels"] != IGNORE_INDEX).sum())
            parts.append((batch, where))
        return self._combine(parts, b)

    def _combine(self, parts: list[tuple[Batch, np.ndarray]], rows: int) -> Batch:
        keys = set(parts[0][0])
        if any(set(p) != keys for p, _ in parts):
            raise ValueError(f"domain and general batches have different fields: {[sorted(p) for p, _ in parts]}")
        width = max(t.shape[1] for p, _ in parts for t in p.values() if t.ndim >= 2)
        out: Batch = {}
        for key in parts[0][0]:
            first = parts[0][0][key]
            merged = torch.empty((rows, *self._padded(first, key, width).shape[1:]), dtype=first.dtype)
            for batch, where in parts:
                merged[torch.from_numpy(where)] = self._padded(batch[key], key, width)
            out[key] = merged
        return out

    def _padded(self, t: torch.Tensor, key: str, width: int) -> torch.Tensor:
        if t.ndim < 2 or t.shape[1] == width:
            return t
        if key not in self.pad_values:
            raise ValueError(f"rows of different widths and no pad value for field {key!r}")
        pad = [0, 0] * (t.ndim - 2) + [0, width - t.shape[1]]
        return F.pad(t, pad, value=self.pad_values[key])

    def stats(self) -> dict[str, float]:
        """Rows and trained (label != -100) tokens from each source so far, and the realised domain fractions."""
        c = self._counts
        rows = c["domain_rows"] + c["general_rows"]
        tokens = c["domain_tokens"] + c["general_tokens"]
        return {
            **{k: float(v) for k, v in c.items()},
            "domain_row_fraction": c["domain_rows"] / rows if rows else 0.0,
            "domain_token_fraction": c["domain_tokens"] / tokens if tokens else 0.0,
        }

    def _own_state(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Row counter, statistics and both inner sources' states."""
        return {
            "rows_drawn": self.rows_drawn,
            "micro_batch_size": self.micro_batch_size,
            "counts": dict(self._counts),
            "seed": self.seed,
            "rank": self.rank,
            "domain_fraction": self.domain_fraction,
            "domain": self.domain.state_dict(),
            "general": self.general.state_dict(),
            **self._own_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the exact next row; refuses a state drawn with another seed, rank or ratio."""
        for key in ("seed", "rank", "domain_fraction"):
            if state[key] != getattr(self, key):
                raise ValueError(f"mixer state has {key}={state[key]}, this mixer has {getattr(self, key)}")
        self.domain.load_state_dict(state["domain"])
        self.general.load_state_dict(state["general"])
        self.rows_drawn = int(state["rows_drawn"])
        self._counts = {k: int(v) for k, v in state["counts"].items()}
        self.micro_batch_size = state["micro_batch_size"]


class MixedTokenSource(MixedBatchSource):
    """Mixing over token sources (e.g. two ``TokenBatchLoader``): every row is ``seq_len`` tokens."""

    seq_len: int | None = None

    def set_seq_len(self, seq_len: int, micro_batch_size: int) -> None:
        """Window length and rows per micro-batch, as the trainer sets them (curriculum, OOM fallback)."""
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size

    def _request(self, source: _Source, rows: int) -> None:
        source.set_seq_len(self.seq_len, rows)  # type: ignore[attr-defined]

    def _own_state(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seq_len = state["seq_len"]


class MixedRowSource(MixedBatchSource):
    """Mixing over row sources (packed or padded examples, each source padding to its longest row)."""

    def set_micro_batch_size(self, rows: int) -> None:
        """Rows per micro-batch, as the trainer sets them."""
        if rows <= 0:
            raise ValueError(f"micro-batch size must be positive, got {rows}")
        self.micro_batch_size = rows

    def _request(self, source: _Source, rows: int) -> None:
        source.set_micro_batch_size(rows)  # type: ignore[attr-defined]
