"""Reading eval data files: JSONL (optionally gzipped), Parquet and CSV rows, with errors that say where."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """One JSON object per non-blank line; ``.gz`` files are decompressed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found")
    opener = gzip.open if p.suffix == ".gz" else open
    rows = []
    with opener(p, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        lines = _lines(f, p)
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: invalid JSON: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{p}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _lines(f: Any, path: Path) -> list[str]:
    try:
        return f.readlines()
    except (UnicodeDecodeError, OSError, EOFError) as e:  # binary, or a damaged .gz
        raise ValueError(f"{path}: not a readable UTF-8 JSONL file ({e})") from None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl(.gz)``, ``.parquet`` or ``.csv`` (with a header) file."""
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if p.suffix == ".csv":
        if not p.is_file():
            raise FileNotFoundError(f"{p}: file not found")
        with p.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return read_jsonl(p)
