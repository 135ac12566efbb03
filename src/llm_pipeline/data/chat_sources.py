"""Where SFT and DPO records come from, and which split each goes to.

Three kinds, one reader each (shared with the pretraining download, :mod:`llm_pipeline.data.sources`):
the embedded standard-library set (:mod:`llm_pipeline.data.stdlib_chat`; validation = the held-out
modules), local JSONL / JSONL.gz / Parquet files or folders, and hub datasets through ``datasets``.
Without an explicit validation source (``val_paths``, ``val_split``) a record goes to validation by a
stable hash of its file name and line (hub: dataset and index), the rule of the pretraining pack step.
Unreadable inputs are written to the rejects log; the caller rejects what it cannot parse or tokenise.
A record larger than ``cfg.record_byte_limit`` is rejected as ``too_large`` before it is parsed or
tokenised (a JSONL line is not even read whole), so one giant record costs no memory.

:func:`build_chat_sources` is the one skeleton of the SFT, LoRA and DPO data builds: template,
rejects file, reading, encoding in chunks, the usable-data check, one batch source per split, report.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from llm_pipeline.data.chat import ChatTemplate, RecordError
from llm_pipeline.data.config import ChatDataConfig
from llm_pipeline.data.pack import assign_split
from llm_pipeline.data.progress import progress_bar
from llm_pipeline.data.sources import (
    Item,
    RejectLog,
    iter_hf_records,
    iter_local_records,
    json_line_limit,
    record_bytes,
)

log = logging.getLogger(__name__)

Stage = Literal["sft", "preference", "rl"]
P = TypeVar("P")  # a parsed record (what the encoder takes)
T = TypeVar("T")  # an encoded record (token ids before the length limits)
E = TypeVar("E")  # a kept example (after the length limits)
S = TypeVar("S")  # a split's batch source
#: Records are tokenised in chunks of this many, or fewer when their text passes ``_CHUNK_BYTES``:
#: the tokenizer's working memory is a few hundred times its input, so chunks are bounded by size too.
_CHUNK_RECORDS = 512
_CHUNK_BYTES = 4 << 20


@dataclass
class RecordStream:
    """Records of one input; ``split`` fixed (a validation file or split) or None (per record)."""

    items: Iterator[Item]
    split: str | None


def record_streams(cfg: ChatDataConfig, stage: Stage) -> list[RecordStream]:
    """The configured inputs, training first (read lazily: a hub stream is never read past the caps)."""
    if cfg.embedded:
        import importlib

        from llm_pipeline.data.config import EMBEDDED_CHAT_SOURCES

        target = EMBEDDED_CHAT_SOURCES[cfg.kind].get(stage)
        if target is None:
            raise ValueError(f"the embedded source {cfg.kind!r} has no {stage} records")
        module, _, func = target.partition(":")
        return [RecordStream(getattr(importlib.import_module(module), func)(cfg), None)]
    if cfg.kind == "local":
        line_limit = json_line_limit(cfg.record_byte_limit)
        streams = [
            RecordStream(iter_local_records(cfg.paths, max_line_bytes=line_limit), "train" if cfg.val_paths else None)
        ]
        if cfg.val_paths:
            streams.append(RecordStream(iter_local_records(cfg.val_paths, max_line_bytes=line_limit), "val"))
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

    Unreadable inputs (malformed JSON, invalid UTF-8, missing files...) and records larger than
    ``cfg.record_byte_limit`` go to ``rejects``.
    """
    limit = cfg.record_byte_limit
    for stream in record_streams(cfg, stage):
        for item in stream.items:
            if item.reject is None and (size := record_bytes(item.record)) > limit:
                item.reject = "too_large"
                item.detail = f"{size} bytes of text > {limit}, the limit set by data.max_seq_len={cfg.max_seq_len}"
            if item.reject is not None:
                rejects.add(item.where, item.reject, item.detail, item.doc_id)
                continue
            key = item.doc_id or item.where  # file name:line or dataset:index, not where the folder sits
            split = stream.split or assign_split(key, item.meta, val_fraction=cfg.val_fraction, seed=0)
            if full(split):
                # A mixed stream ends with its training cap, except the embedded set: its validation split is
                # the held-out modules, in full, wherever they fall in the stream (cheap: it is in memory).
                if stream.split is not None or (split == "train" and not cfg.embedded):
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
    chunk: int = _CHUNK_RECORDS,
) -> dict[str, list[E]]:
    """Read, parse and encode the configured records into ``{"train": [...], "val": [...]}``.

    ``parse`` turns one record into what ``encode`` takes (or raises :class:`RecordError`); ``encode``
    handles a chunk at once (one batched tokenizer call) and returns an example or a RecordError per
    input. Every rejected record is written with its file:line and reason; reading stops at the caps.
    """
    caps = {"train": cfg.max_examples, "val": cfg.max_val_examples}
    kept: dict[str, list[E]] = {"train": [], "val": []}
    pending: list[tuple[str, Item, P | RecordError]] = []  # in input order, so rejects are too
    pending_bytes = 0

    def full(split: str) -> bool:
        cap = caps[split]
        return cap is not None and len(kept[split]) >= cap

    def flush() -> None:
        nonlocal pending_bytes
        pending_bytes = 0
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
            pending_bytes += record_bytes(item.record)
            if len(pending) >= chunk or pending_bytes >= _CHUNK_BYTES:
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


def resolve_rejects_path(rejects_path: str | None, output_dir: str | os.PathLike[str] | None, stage: str) -> Path:
    """The configured rejects file, else ``<output_dir>/<stage>_rejects.jsonl``."""
    if rejects_path:
        return Path(rejects_path)
    if output_dir is None:
        raise ValueError(f"{stage} data: set data.rejects_path or pass output_dir (where rejected records go)")
    return Path(output_dir) / f"{stage}_rejects.jsonl"


def mixture_rejects_path(
    rejects_path: str | None, output_dir: str | os.PathLike[str] | None, stage: str, name: str
) -> Path | None:
    """A mixture source's own rejects file: the configured one with ``_<name>`` before its suffix, else
    ``<output_dir>/<stage>_<name>_rejects.jsonl`` (None when neither is known)."""
    if rejects_path:
        given = Path(rejects_path)
        return given.with_name(f"{given.stem}_{name}{given.suffix}")
    return Path(output_dir) / f"{stage}_{name}_rejects.jsonl" if output_dir is not None else None


def pad_id_of(template: ChatTemplate) -> int:
    """The tokenizer's pad id (padding carries no loss, any id would do; 0 when it has none)."""
    for key in ("pad_token", "eos_token"):
        name = template.variables.get(key)
        if name is not None and (i := template.tokenizer.token_to_id(name)) is not None:
            return i
    return 0


_WHAT = {"sft": ("SFT data", "examples"), "preference": ("preference data", "pairs")}


def build_chat_sources(
    cfg: ChatDataConfig,
    template: ChatTemplate,
    stage: Stage,
    *,
    parse: Callable[[Any], P],
    encode: Callable[[list[P]], Iterable[T | RecordError]],
    fit: Callable[[T], E],
    make_source: Callable[[str, list[E]], S],
    rank: int = 0,
    output_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
) -> tuple[dict[str, S], dict[str, Any]]:
    """Read, parse, tokenise and fit the configured records into one batch source per split.

    ``parse`` turns a record into a conversation (or raises :class:`RecordError`), ``encode`` tokenises
    a chunk of them, ``fit`` applies the length limits to one encoded record (or raises), and
    ``make_source`` builds a split's batch source from its kept examples. Only rank 0 writes the
    rejects file; every rank builds the same examples. Returns ``({split: source}, report)``.
    """
    start = time.perf_counter()
    rejects_path = resolve_rejects_path(cfg.rejects_path, output_dir, stage)

    def encode_chunk(parsed: list[P]) -> list[E | RecordError]:
        out: list[E | RecordError] = []
        for enc in encode(parsed):
            try:
                if isinstance(enc, RecordError):
                    raise enc
                out.append(fit(enc))
            except RecordError as e:
                out.append(e)
        return out

    what, unit = _WHAT[stage]
    with RejectLog(rejects_path if rank == 0 else None) as rejects:
        kept = collect_examples(cfg, stage, rejects, parse=parse, encode=encode_chunk, show_progress=show_progress)
    check_usable(kept, rejects, f"{what} ({cfg.kind})", cfg)
    sources = {split: make_source(split, examples) for split, examples in kept.items() if examples}
    rejected = dict(sorted(rejects.counts.items()))
    report: dict[str, Any] = {
        "source": cfg.kind,
        "chat_template": template.source,
        "template_has_generation_blocks": template.has_generation_blocks,
        "rejected": rejected,
        "rejects_path": str(rejects_path),
        **{split: src.stats() for split, src in sources.items()},  # type: ignore[attr-defined]
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    packing = report["train"].get("packing_efficiency")
    log.info(
        "%s: %d train / %d val %s%s, %d rejected (%s) in %.1fs",
        what,
        len(kept["train"]),
        len(kept["val"]),
        unit,
        f", packing efficiency {100 * packing:.1f}%" if packing is not None else "",
        sum(rejected.values()),
        rejects_path,
        report["build_seconds"],
    )
    return sources, report
