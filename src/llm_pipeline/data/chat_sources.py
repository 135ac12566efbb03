"""Where SFT and DPO records come from, and which split each goes to.

Three kinds, one reader each (shared with the pretraining download, :mod:`llm_pipeline.data.sources`):
the embedded standard-library set (:mod:`llm_pipeline.data.stdlib_chat`; validation = the held-out
modules), local JSONL / JSONL.gz / Parquet files or folders, and hub datasets through ``datasets``.
Without an explicit validation source (``val_paths``, ``val_split``) a record goes to validation by a
stable hash of its file name and line (hub: dataset and index), the rule of the pretraining pack step.
Unreadable inputs are written to the rejects log; the caller rejects what it cannot parse or tokenise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from llm_pipeline.data.chat import RecordError
from llm_pipeline.data.config import ChatDataConfig
from llm_pipeline.data.pack import assign_split
from llm_pipeline.data.progress import progress_bar
from llm_pipeline.data.sources import Item, RejectLog, iter_hf_records, iter_local_records

Stage = Literal["sft", "preference"]
P = TypeVar("P")
E = TypeVar("E")


@dataclass
class RecordStream:
    """Records of one input; ``split`` fixed (a validation file or split) or None (per record)."""

    items: Iterator[Item]
    split: str | None


def record_streams(cfg: ChatDataConfig, stage: Stage) -> list[RecordStream]:
    """The configured inputs, training first (read lazily: a hub stream is never read past the caps)."""
    if cfg.kind == "stdlib":
        from llm_pipeline.data.stdlib_chat import stdlib_functions, stdlib_preference_records, stdlib_sft_records

        make = stdlib_sft_records if stage == "sft" else stdlib_preference_records
        return [RecordStream(make(stdlib_functions(cfg.held_out_modules)), None)]
    if cfg.kind == "local":
        streams = [RecordStream(iter_local_records(cfg.paths), "train" if cfg.val_paths else None)]
        if cfg.val_paths:
            streams.append(RecordStream(iter_local_records(cfg.val_paths), "val"))
        return streams
    assert cfg.name is not None
    streams = [
        RecordStream(
            iter_hf_records(cfg.name, cfg.config_name, cfg.split, streaming=cfg.streaming),
            "train" if cfg.val_split else None,
        )
    ]
    if cfg.val_split:
        streams.append(
            RecordStream(iter_hf_records(cfg.name, cfg.config_name, cfg.val_split, streaming=cfg.streaming), "val")
        )
    return streams


def iter_split_records(
    cfg: ChatDataConfig, stage: Stage, rejects: RejectLog, *, full: Callable[[str], bool]
) -> Iterator[tuple[str, Item]]:
    """``(split, item)`` for every readable record until ``full(split)`` says a split has enough.

    Unreadable inputs (malformed JSON, invalid UTF-8, missing files...) go to ``rejects``.
    """
    for stream in record_streams(cfg, stage):
        for item in stream.items:
            if item.reject is not None:
                rejects.add(item.where, item.reject, item.detail, item.doc_id)
                continue
            key = item.doc_id or item.where  # file name:line or dataset:index, not where the folder sits
            split = stream.split or assign_split(key, item.meta, val_fraction=cfg.val_fraction, seed=0)
            if full(split):
                if stream.split is not None or split == "train":  # a mixed stream ends with its training cap
                    break
                continue
            yield split, item


def collect_examples(
    cfg: ChatDataConfig,
    stage: Stage,
    rejects: RejectLog,
    *,
    parse: Callable[[Any], P],
    encode: Callable[[list[P]], list[E | RecordError]],
    show_progress: bool = True,
    chunk: int = 512,
) -> dict[str, list[E]]:
    """Read, parse and encode the configured records into ``{"train": [...], "val": [...]}``.

    ``parse`` turns one record into what ``encode`` takes (or raises :class:`RecordError`); ``encode``
    handles a chunk at once (one batched tokenizer call) and returns an example or a RecordError per
    input. Every rejected record is written with its file:line and reason; reading stops at the caps.
    """
    caps = {"train": cfg.max_examples, "val": cfg.max_val_examples}
    kept: dict[str, list[E]] = {"train": [], "val": []}
    pending: list[tuple[str, Item, P | RecordError]] = []  # in input order, so rejects are too

    def full(split: str) -> bool:
        cap = caps[split]
        return cap is not None and len(kept[split]) >= cap

    def flush() -> None:
        encoded = iter(encode([p for _, _, p in pending if not isinstance(p, RecordError)]))
        for split, item, parsed in pending:
            result = parsed if isinstance(parsed, RecordError) else next(encoded)
            if isinstance(result, RecordError):
                rejects.add(item.where, result.reason, result.detail, item.doc_id)
            elif not full(split):
                kept[split].append(result)
        pending.clear()

    with progress_bar(f"{stage} data", enabled=show_progress) as bar:
        for split, item in iter_split_records(cfg, stage, rejects, full=full):
            bar.advance(1)
            try:
                pending.append((split, item, parse(item.record)))
            except RecordError as e:
                pending.append((split, item, e))
            if len(pending) >= chunk:
                flush()
        flush()
    return kept


def check_usable(kept: dict[str, list[Any]], rejects: RejectLog, what: str, cfg: ChatDataConfig) -> None:
    """A source with no usable record (training, or a configured validation source) is an error that
    names the counts and the rejects file."""
    empty = [s for s in ("train", "val") if not kept[s] and (s == "train" or cfg.val_paths or cfg.val_split)]
    if empty:
        rejected = dict(sorted(rejects.counts.items())) or "nothing read"
        where = rejects.path or "the rejects file (written by rank 0)"
        raise ValueError(
            f"{what}: no usable {' or '.join(empty)} record (rejected: {rejected}); "
            f"see {where} for each rejected record with its file:line and reason"
        )
