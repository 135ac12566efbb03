"""Document sources -> compressed JSONL shards (``llm-pipeline data download``).

Three kinds of source share one writer: the embedded default (the Python standard library's own
sources and docs, found through ``sysconfig``, so the pipeline runs offline), HF hub datasets
streamed through ``datasets``, and local JSONL / JSONL.gz / Parquet / text folders.

Nothing is lost silently: every bad input (malformed JSON line, invalid UTF-8, empty or oversized
document, unreadable or missing file, Parquet file without the text column) is counted by reason and
written to ``rejects.jsonl`` with its file and line; the run goes on. Sizes are checked before text is
held whole: a text file larger than the document limit is never read, and a JSONL line is read up to
:func:`json_line_limit` of it (a longer line is skipped in small pieces), so one giant input cannot
exhaust memory. The download is resumable: a
``progress.json`` after each shard records how many source items were consumed.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
import sysconfig
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_pipeline.config import config_to_dict
from llm_pipeline.data.config import DataConfig, SourceConfig
from llm_pipeline.data.manifest import MANIFEST, write_json
from llm_pipeline.data.progress import progress_bar
from llm_pipeline.hashing import file_sha256, stable_hash

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
REJECTS = "rejects.jsonl"
PROGRESS = "progress.json"
# JSON spells one byte of text in at most 6 (``\u0000``); the rest of a line is keys and metadata.
_JSON_ESCAPE_FACTOR = 6
_JSON_LINE_OVERHEAD = 64 << 10
_SKIP_CHUNK = 256 << 10


def json_line_limit(text_bytes: int) -> int:
    """The longest JSONL line that can hold a record of ``text_bytes`` of text (escapes and keys included)."""
    return _JSON_ESCAPE_FACTOR * text_bytes + _JSON_LINE_OVERHEAD


def record_bytes(value: Any) -> int:
    """UTF-8 bytes of every string in a record (keys included): what tokenising it would have to hold."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(record_bytes(k) + record_bytes(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(record_bytes(v) for v in value)
    return 0


@dataclass
class Item:
    """One thing read from a source: a document, or a rejected input with its reason."""

    where: str  # "file" or "file:line"
    text: str | None = None
    doc_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    reject: str | None = None
    detail: str = ""
    record: Any = None  # the raw record of a JSONL line, Parquet row or hub example


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_test_path(rel: Path) -> bool:
    return any(p in ("test", "tests", "idle_test") for p in rel.parts[:-1])


def iter_stdlib(cfg: SourceConfig) -> Iterator[Item]:
    """The stdlib's .py sources (and .rst/.txt docs), in a stable order; held-out modules get split=val,
    domain modules split=domain, and (``docs_split``) the other docs split=docs."""
    root = stdlib_root()
    suffixes = {".py"} | ({".rst", ".txt"} if cfg.include_docs else set())
    held_out, domain = set(cfg.held_out_modules), set(cfg.domain_modules)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "dist-packages"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if path.suffix not in suffixes or (not cfg.include_tests and _is_test_path(rel)):
                continue
            module = rel.parts[0].removesuffix(".py")
            meta = {"source": "stdlib", "path": rel.as_posix(), "module": module}
            if module in held_out:
                meta["split"] = "val"
            elif module in domain:
                meta["split"] = "domain"
            elif cfg.docs_split and path.suffix != ".py":
                meta["split"] = "docs"
            yield from _read_text_file(path, f"stdlib:{rel.as_posix()}", meta, cfg.max_document_bytes)


def _read_text_file(path: Path, doc_id: str, meta: dict[str, Any], max_bytes: int) -> Iterator[Item]:
    """One document per file; a file over ``max_bytes`` is rejected from its size, unread."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            yield Item(str(path), reject="too_large", detail=f"{size} bytes > max_document_bytes={max_bytes}")
            return
        raw = path.read_bytes()
    except OSError as e:
        yield Item(str(path), reject="unreadable_file", detail=str(e))
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield Item(str(path), reject="invalid_utf8", detail=str(e))
        return
    yield Item(str(path), text=text, doc_id=doc_id, meta=meta)


def _expand_paths(paths: list[str]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file())
        else:
            yield p  # missing files are reported by the reader


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in (*JSONL_SUFFIXES, ".parquet", *TEXT_SUFFIXES):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def iter_local(cfg: SourceConfig) -> Iterator[Item]:
    """JSONL(.gz), Parquet and plain-text files; folders are walked recursively in sorted order."""
    for path in _expand_paths(cfg.paths):
        if path.exists() and _suffix(path) in TEXT_SUFFIXES:
            meta = {"source": "local", "path": str(path)}
            yield from _read_text_file(path, f"{path.name}", meta, cfg.max_document_bytes)
            continue
        line_limit = json_line_limit(cfg.max_document_bytes)
        for item in iter_file_records(path, required_column=cfg.text_column, max_line_bytes=line_limit):
            yield item if item.reject else _record_to_item(item.record, item.where, cfg, str(item.doc_id), "local")


def iter_local_records(paths: list[str], *, max_line_bytes: int | None = None) -> Iterator[Item]:
    """Raw records (``Item.record``) of JSONL(.gz) / Parquet files and folders, bad inputs as rejects.

    The one reader of local record files: the data download and the SFT/DPO datasets both use it.
    A JSONL line longer than ``max_line_bytes`` is rejected as ``too_large`` without being held whole.
    """
    for path in _expand_paths(paths):
        yield from iter_file_records(path, max_line_bytes=max_line_bytes)


def iter_file_records(
    path: Path, *, required_column: str | None = None, max_line_bytes: int | None = None
) -> Iterator[Item]:
    """Records of one JSONL(.gz) or Parquet file with ``where = file:line`` (Parquet: file:row)."""
    if not path.exists():
        yield Item(str(path), reject="missing_file", detail="no such file or folder")
        return
    kind = _suffix(path)
    if kind in JSONL_SUFFIXES:
        yield from _iter_jsonl(path, max_line_bytes)
    elif kind == ".parquet":
        yield from _iter_parquet(path, required_column)
    else:
        yield Item(str(path), reject="unsupported_file", detail=f"unknown file type {kind!r}")


def _record_to_item(rec: Any, where: str, cfg: SourceConfig, default_id: str, source: str) -> Item:
    if not isinstance(rec, dict):
        return Item(where, reject="malformed_record", detail=f"expected a JSON object, got {type(rec).__name__}")
    bad = _unwritable_value(rec)
    if bad is not None:
        return Item(where, reject=bad[0], detail=bad[1])
    text = rec.get(cfg.text_column)
    if not isinstance(text, str):
        got = "missing" if text is None else type(text).__name__
        return Item(where, reject="missing_text", detail=f"field {cfg.text_column!r} is {got}")
    doc_id = str(rec[cfg.id_column]) if cfg.id_column and rec.get(cfg.id_column) is not None else default_id
    meta = {k: v for k, v in rec.items() if k not in (cfg.text_column, cfg.id_column) and _jsonable(v)}
    meta.setdefault("source", source)
    return Item(where, text=text, doc_id=doc_id, meta=meta)


def _unwritable_value(value: Any, key: str = "") -> tuple[str, str] | None:
    """(reason, detail) for a value no UTF-8 / strict-JSON writer can store, anywhere in a record.

    JSON text may spell a lone surrogate (``"\\ud800"``) or ``NaN``/``Infinity``, and Python reads both,
    but neither can be written back as UTF-8 JSON that the cleaning step (orjson) accepts.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return "invalid_unicode", f"field {key or '<value>'!r}: lone surrogate {value[e.start]!r} at {e.start}"
    elif isinstance(value, float) and not math.isfinite(value):
        return "non_finite_number", f"field {key or '<value>'!r} is {value} (JSON has no NaN or Infinity)"
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _unwritable_value(k, key) or _unwritable_value(v, f"{key}.{k}" if key else str(k))
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _unwritable_value(v, f"{key}[{i}]")
            if found:
                return found
    return None


def _jsonable(v: Any) -> bool:
    return isinstance(v, str | int | float | bool | type(None) | list | dict)


def _lines(fh: io.BufferedIOBase, limit: int | None) -> Iterator[bytes | int]:
    """The file's lines; a line longer than ``limit`` comes as its length (an int), read in pieces, never whole."""
    if limit is None:
        yield from fh
        return
    while raw := fh.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw
            continue
        size = len(raw)
        while True:  # skip to the end of the line, one bounded piece at a time
            piece = fh.readline(_SKIP_CHUNK)
            size += len(piece)
            if not piece or piece.endswith(b"\n"):
                break
        yield size


def _iter_jsonl(path: Path, max_line_bytes: int | None = None) -> Iterator[Item]:
    try:
        fh: io.BufferedIOBase = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    except OSError as e:
        yield Item(str(path), reject="unreadable_file", detail=str(e))
        return
    with fh:
        lineno = 0
        try:
            for lineno, raw in enumerate(_lines(fh, max_line_bytes), 1):
                where = f"{path}:{lineno}"
                if isinstance(raw, int):
                    detail = f"line of {raw} bytes > {max_line_bytes}, the longest a record within the size limit needs"
                    yield Item(where, reject="too_large", detail=detail)
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Item(where, reject="invalid_utf8", detail=str(e))
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Item(where, reject="malformed_json", detail=f"{e.msg} at column {e.colno}")
                    continue
                yield Item(where, doc_id=f"{path.name}:{lineno}", record=rec)
        except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt compressed file
            yield Item(f"{path}:{lineno + 1}", reject="unreadable_file", detail=str(e))


def _iter_parquet(path: Path, required_column: str | None) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        yield Item(str(path), reject="unreadable_file", detail=str(e))
        return
    columns = pf.schema_arrow.names
    if required_column is not None and required_column not in columns:
        yield Item(str(path), reject="missing_text_column", detail=f"no column {required_column!r}; has {columns}")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield Item(f"{path}:{row}", doc_id=f"{path.name}:{row}", record=rec)


def iter_hf_records(
    dataset: str, subset: str | None, split: str, *, streaming: bool = True, skip: int = 0
) -> Iterator[Item]:
    """Raw records of an HF hub dataset (streamed by default, so never downloaded whole).

    ``where`` is ``dataset/subset/split:n`` (1-based), the hub's equivalent of file:line.
    """
    import datasets

    ds = datasets.load_dataset(dataset, subset, split=split, streaming=streaming)
    if skip:
        ds = ds.skip(skip)
    name = f"{dataset}/{subset or ''}/{split}"
    for i, rec in enumerate(ds, skip):
        yield Item(f"{name}:{i + 1}", doc_id=f"{dataset}:{i}", record=rec)


def iter_hf(cfg: SourceConfig, skip: int = 0) -> Iterator[Item]:
    """Stream an HF hub dataset (never downloads it whole); ``skip`` resumes after a crash."""
    assert cfg.dataset is not None
    for item in iter_hf_records(cfg.dataset, cfg.subset, cfg.split, skip=skip):
        yield _record_to_item(item.record, item.where, cfg, str(item.doc_id), cfg.dataset)


def iter_source(cfg: SourceConfig, skip: int = 0) -> Iterator[Item]:
    """All items of the configured source, after ``skip`` already-consumed ones."""
    if cfg.kind == "hf":
        yield from iter_hf(cfg, skip)
        return
    it = iter_stdlib(cfg) if cfg.kind == "stdlib" else iter_local(cfg)
    for i, item in enumerate(it):
        if i >= skip:
            yield item


# --------------------------------------------------------------------------------------------
# Writing shards
# --------------------------------------------------------------------------------------------


def open_jsonl_gz_writer(path: Path) -> gzip.GzipFile:
    """Deterministic gzip (no name or mtime in the header): same documents, same bytes."""
    return gzip.GzipFile(filename="", mode="wb", fileobj=open(path, "wb"), mtime=0)


def iter_jsonl_documents(folder: str | os.PathLike[str], pattern: str = "*.jsonl.gz") -> Iterator[dict[str, Any]]:
    """Documents of a folder of JSONL(.gz) shards in sorted file order, as ``{"id", "text", "metadata"}``.

    Reads both our raw layout (extra keys at top level) and datatrove's (``metadata`` object).
    """
    for path in sorted(Path(folder).glob(pattern)):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                meta = dict(rec.pop("metadata", None) or {})
                text, doc_id = rec.pop("text"), rec.pop("id")
                meta.update({k: v for k, v in rec.items() if k != "media"})
                yield {"id": doc_id, "text": text, "metadata": meta}


class _ShardWriter:
    def __init__(self, out: Path, per_shard: int, shards: list[dict[str, Any]]) -> None:
        self.out, self.per_shard, self.shards = out, per_shard, shards
        self.buf: list[bytes] = []
        self.nbytes = 0

    def add(self, record: dict[str, Any], text_bytes: int) -> bool:
        self.buf.append(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.nbytes += text_bytes
        return len(self.buf) >= self.per_shard

    def flush(self) -> None:
        if not self.buf:
            return
        name = f"shard_{len(self.shards):05d}.jsonl.gz"
        tmp = self.out / f".{name}.tmp"
        with open_jsonl_gz_writer(tmp) as f:
            f.writelines(self.buf)
        os.replace(tmp, self.out / name)
        self.shards.append(
            {"path": name, "documents": len(self.buf), "bytes": self.nbytes, "sha256": file_sha256(self.out / name)}
        )
        self.buf, self.nbytes = [], 0


def source_fingerprint(cfg: DataConfig) -> str:
    """Fingerprint of the download step: source config plus what it reads (stdlib version, local file stats)."""
    extra: list[Any] = []
    if cfg.source.kind == "stdlib":
        extra = [str(stdlib_root()), sysconfig.get_python_version()]
    elif cfg.source.kind == "local":
        for p in _expand_paths(cfg.source.paths):
            st = p.stat() if p.exists() else None
            extra.append([str(p), st.st_size if st else None, st.st_mtime_ns if st else None])
    source = config_to_dict(cfg.source)
    if not source.get("docs_split"):  # off: the fingerprint of every data step prepared before the option existed
        source.pop("docs_split", None)
    return stable_hash("download", source, extra)


def download(cfg: DataConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Read the configured source into ``<output_dir>/raw`` shards with a manifest; resumes an interrupted run."""
    src = cfg.source
    out = cfg.raw_dir
    out.mkdir(parents=True, exist_ok=True)
    fp = source_fingerprint(cfg)
    rejects_path = out / REJECTS

    # Resume from the last completed shard of an interrupted run with the same source and config.
    state: dict[str, Any] = {"consumed": 0, "documents": 0, "bytes": 0, "rejected": {}, "shards": [], "rejects_size": 0}
    prog_path = out / PROGRESS
    if prog_path.is_file():
        prev = json.loads(prog_path.read_text())
        if prev.get("fingerprint") == fp:
            state = prev["state"]
            log.info("resuming download after %d source items (%d shards)", state["consumed"], len(state["shards"]))
    if not state["shards"]:
        for old in out.glob("shard_*.jsonl.gz"):
            old.unlink()
    (out / MANIFEST).unlink(missing_ok=True)
    rejected = Counter(state["rejected"])
    with open(rejects_path, "ab") as rf:
        rf.truncate(state["rejects_size"])
    writer = _ShardWriter(out, src.documents_per_shard, state["shards"])
    consumed = state["consumed"]
    documents, nbytes = state["documents"], state["bytes"]

    def checkpoint() -> None:
        writer.flush()
        state.update(consumed=consumed, documents=documents, bytes=nbytes, rejected=dict(rejected), renamed=renamed)
        state["rejects_size"] = rejects_path.stat().st_size
        write_json(prog_path, {"fingerprint": fp, "state": state})

    total = src.max_documents
    seen_ids: set[str] = set()
    for shard in state["shards"]:  # a resumed run must still see the ids already written
        seen_ids.update(str(d["id"]) for d in iter_jsonl_documents(out, shard["path"]))
    renamed = state.get("renamed", 0)
    with (
        open(rejects_path, "a", encoding="utf-8") as rejects,
        progress_bar("download", total=total, enabled=show_progress) as bar,
    ):
        for item in iter_source(src, skip=consumed):
            consumed += 1
            reason, detail = item.reject, item.detail
            if reason is None:
                assert item.text is not None
                size = len(item.text.encode("utf-8", errors="surrogatepass"))
                if not item.text.strip():
                    reason, detail = "empty", "no non-whitespace text"
                elif size > src.max_document_bytes:
                    reason, detail = "too_large", f"{size} bytes > max_document_bytes={src.max_document_bytes}"
            if reason is not None:
                rejected[reason] += 1
                rejects.write(json.dumps(reject_record(item.where, reason, detail, item.doc_id)) + "\n")
                continue
            doc_id = str(item.doc_id)
            if doc_id in seen_ids:  # dedup and splits key on ids: keep them unique
                renamed += 1
                doc_id = f"{doc_id}#{consumed}"
            seen_ids.add(doc_id)
            documents += 1
            nbytes += size
            bar.advance(1)
            record = {"id": doc_id, "text": item.text, **item.meta}
            if writer.add(record, size):
                rejects.flush()
                checkpoint()
            if (src.max_documents and documents >= src.max_documents) or (src.max_bytes and nbytes >= src.max_bytes):
                break
        rejects.flush()
        checkpoint()

    if documents == 0:
        raise ValueError(
            f"source {src.kind} produced no usable documents (rejected: {dict(rejected) or 'nothing read'}); "
            f"see {rejects_path} for each rejected input with its file and line"
        )
    manifest = {
        "step": "download",
        "fingerprint": fp,
        "documents": documents,
        "bytes": nbytes,
        "rejected": dict(sorted(rejected.items())),
        "rejects_file": REJECTS,
        "source_items": consumed,
        "renamed_duplicate_ids": renamed,
        "shards": state["shards"],
        "config": config_to_dict(src),
    }
    write_json(out / MANIFEST, manifest)
    prog_path.unlink(missing_ok=True)
    if rejected:
        log.warning(
            "download: %d inputs rejected %s (details in %s)", sum(rejected.values()), dict(rejected), rejects_path
        )
    log.info("download: %d documents, %.1f MB in %d shards -> %s", documents, nbytes / 1e6, len(state["shards"]), out)
    return manifest


class RejectLog:
    """Counts rejected inputs by reason and writes each as one :func:`reject_record` line.

    The file is created (emptied) at once, so a stale one from an earlier run never misleads; with
    ``path=None`` (ranks other than 0) it only counts.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self.counts: Counter[str] = Counter()
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def add(self, where: str, reason: str, detail: str = "", doc_id: str | None = None) -> None:
        self.counts[reason] += 1
        if self._fh is not None:
            self._fh.write(json.dumps(reject_record(where, reason, detail, doc_id)) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RejectLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reject_record(where: str, reason: str, detail: str, doc_id: str | None = None) -> dict[str, Any]:
    """One line of a rejects file: ``{"file", "line", "reason", "detail", "id"}`` from a ``file:line`` place."""
    file, _, line = where.rpartition(":")
    if not line.isdigit():
        file, line = where, ""
    return {"file": file, "line": int(line) if line else None, "reason": reason, "detail": detail, "id": doc_id}
