"""Manifests and step fingerprints: what each data step produced, and whether it is up to date.

Every step writes ``manifest.json`` (counts, hashes, resolved config, and a ``fingerprint`` of its
inputs and config). ``data prepare`` compares fingerprints to skip steps whose inputs did not change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """Write JSON atomically (temp file + fsync + rename): a reader never sees half a manifest."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return p


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``<directory>/manifest.json`` with an error that says which step to run."""
    p = Path(directory) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run the step that produces {Path(directory)} first")
    return json.loads(p.read_text(encoding="utf-8"))


def is_up_to_date(directory: str | os.PathLike[str], expected_fingerprint: str) -> bool:
    """True when the step's manifest exists and was made from the same inputs and config."""
    try:
        return read_manifest(directory).get("fingerprint") == expected_fingerprint
    except (FileNotFoundError, json.JSONDecodeError):
        return False
