"""The project's one home for hashes: config fingerprints, file and folder digests, model identity.

Which to use:

- :func:`stable_hash` -- a JSON-able value (config sections, upstream fingerprints): the data steps'
  manifests, the pipeline's stage fingerprints (:func:`short_hash`, its first 16 hex digits).
- :func:`file_sha256` -- one file's bytes (manifests, ``checksums.sha256``).
- :func:`bytes_digest` -- buffers already in memory (token arrays of a data set).
- :func:`files_digest` -- several files' names and bytes (a tokenizer folder, a DPO reference key).
- :func:`folder_digest` -- every file of a folder by content (an export a later stage starts from);
  unlike name/size/mtime it does not change when the same bytes are written again.
- a start model's identity is :func:`files_digest` over :data:`MODEL_FILE_PATTERNS`
  (``train.model_setup.start_model_digest``, cached per process): changed in place, a new digest;
  the same bytes copied elsewhere keep theirs.
- :func:`hash64` -- a 64-bit integer of a string (splits, sampling, exact dedup): a number, not an identity.

All values are stable across processes, machines and Python versions (no ``hash()``, no pickles).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_CHUNK = 8 << 20
#: The files that define a model's weights in an HF folder (tokenizer files are not the model).
MODEL_FILE_PATTERNS: tuple[str, ...] = ("config.json", "*.safetensors", "*.safetensors.index.json")


def stable_hash(*parts: Any) -> str:
    """sha256 hex of JSON-able parts (sorted keys, compact; other values by ``str``): equal values, equal hash."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def short_hash(*parts: Any) -> str:
    """The first 16 hex digits of :func:`stable_hash`: short enough to show, long enough not to collide."""
    return stable_hash(*parts)[:16]


def file_sha256(path: str | os.PathLike[str], chunk: int = _CHUNK) -> str:
    """sha256 hex of a file's bytes, read in chunks (memory stays flat for any file size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bytes_digest(*chunks: bytes | memoryview | str) -> str:
    """sha256 hex of the chunks one after the other (``str`` as UTF-8): the same as hashing their concatenation."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.encode("utf-8") if isinstance(c, str) else c)
    return h.hexdigest()


def files_digest(paths: Iterable[Path], root: Path) -> str:
    """sha256 hex over each file's path relative to ``root`` (NUL-ended) then its bytes, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def folder_digest(path: str | os.PathLike[str], patterns: Iterable[str] = ("**/*",)) -> str | None:
    """:func:`short_hash` of (relative name, size, sha256) for the folder's files matching ``patterns``.

    ``None`` when the folder does not exist or holds no such file. Content, not modification times:
    writing the same bytes again keeps the digest, a changed byte changes it.
    """
    root = Path(path)
    if not root.is_dir():
        return None
    files = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    rows = [(p.relative_to(root).as_posix(), p.stat().st_size, _cached_sha256(p)) for p in files]
    return short_hash(rows) if rows else None


def hash64(text: str) -> int:
    """A stable 64-bit number of ``text`` (blake2b, little-endian): for splits, sampling and exact dedup."""
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# A file's sha256 by (path, inode, size, mtime_ns): unchanged files are not read twice in one process.
_SHA_CACHE: dict[tuple[str, int, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]
