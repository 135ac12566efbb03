"""Checksum manifests: a checkpoint or an export proves its bytes are the ones that were written.

A bit flip or a truncated shard in a committed checkpoint would otherwise load silently and change
the weights. Each rank hashes the files it wrote (in the background thread when the save is async),
rank 0 merges the parts into ``checksums.sha256`` before the commit marker, in ``sha256sum``'s own
format, so ``cd checkpoint-N && sha256sum -c checksums.sha256`` checks a checkpoint by hand too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llm_pipeline.checkpoint.fsio import fsync_path, write_text_synced
from llm_pipeline.hashing import file_sha256

MANIFEST = "checksums.sha256"
_PART = ".checksums-rank{rank}.sha256"
_PART_RE = re.compile(r"^\.checksums-rank\d+\.sha256$")
# Files written by one rank: DCP shards (``__<rank>_<n>.distcp``) and the rank's own state.
_RANK_FILE = re.compile(r"^(?:__(\d+)_\d+\.distcp|rank_(\d+)\.pt)$")


class ChecksumMismatch(RuntimeError):
    """A checkpoint's files differ from its manifest: damaged after it was written."""


def _owned_by(name: str, rank: int) -> bool:
    m = _RANK_FILE.match(name)
    if m:
        return int(m.group(1) or m.group(2)) == rank
    return rank == 0  # .metadata, trainer_state.pt, config.yaml, meta.json: rank 0 writes them


def format_manifest(sums: dict[str, str]) -> str:
    """``sha256sum`` lines, sorted by name."""
    return "".join(f"{h}  {name}\n" for name, h in sorted(sums.items()))


def parse_manifest(text: str, source: Path) -> dict[str, str]:
    """name -> sha256 hex from ``sha256sum`` lines (raises :class:`ChecksumMismatch` on a malformed line)."""
    sums = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ChecksumMismatch(f"{source}:{n}: malformed checksum line")
        sums[name] = digest
    return sums


def write_part(folder: Path, rank: int, marker: str) -> None:
    """Hash the files ``rank`` wrote into ``folder`` (call once its writes are complete)."""
    sums = {
        p.name: file_sha256(p)
        for p in folder.iterdir()
        if p.is_file() and p.name not in (MANIFEST, marker) and not _PART_RE.match(p.name) and _owned_by(p.name, rank)
    }
    write_text_synced(folder / _PART.format(rank=rank), format_manifest(sums))


def merge_parts(folder: Path, world_size: int) -> None:
    """Rank 0, after every rank wrote its part: one ``checksums.sha256``, fsynced, parts removed."""
    sums: dict[str, str] = {}
    for r in range(world_size):
        part = folder / _PART.format(rank=r)
        sums.update(parse_manifest(part.read_text(encoding="utf-8"), part))
    write_text_synced(folder / MANIFEST, format_manifest(sums))
    for r in range(world_size):
        (folder / _PART.format(rank=r)).unlink()
    fsync_path(folder)


def hash_files(folder: Path, names: Iterable[str], *, workers: int | None = None) -> dict[str, str]:
    """name -> sha256 of files in ``folder``, on a few threads (hashlib releases the GIL: shards in parallel)."""
    names = sorted(names)
    workers = max(1, min(workers or 4, os.cpu_count() or 1, len(names) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = pool.map(lambda n: file_sha256(folder / n, chunk=8 << 20), names)
        return dict(zip(names, digests, strict=True))


def write_manifest(folder: Path, names: Iterable[str]) -> None:
    """Hash ``names`` in ``folder`` and write its ``checksums.sha256`` (fsynced): an export's, once written."""
    write_text_synced(folder / MANIFEST, format_manifest(hash_files(folder, names)))


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, str] | None:
    """name -> sha256 hex, or None for a checkpoint saved before manifests existed."""
    path = Path(folder) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ChecksumMismatch(f"{path}: unreadable checksum manifest ({e})") from None
    return parse_manifest(text, path)


def verify(
    folder: str | os.PathLike[str], sums: dict[str, str], *, rank: int = 0, world_size: int = 1, workers: int = 1
) -> list[str]:
    """Check this rank's share of the files (every ``world_size``-th), on ``workers`` threads; one line per problem."""
    root = Path(folder)
    mine = [(name, digest) for i, (name, digest) in enumerate(sorted(sums.items())) if i % world_size == rank]

    def check(item: tuple[str, str]) -> str | None:
        name, digest = item
        path = root / name
        if not path.is_file():
            return f"{name}: missing"
        try:
            actual = file_sha256(path)
        except OSError as e:
            return f"{name}: unreadable ({e.strerror or e})"
        if actual != digest:
            return f"{name}: sha256 {actual[:12]}... differs from the manifest's {digest[:12]}..."
        return None

    if workers > 1 and len(mine) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(mine))) as pool:
            found = list(pool.map(check, mine))
    else:
        found = [check(item) for item in mine]
    return [p for p in found if p is not None]
