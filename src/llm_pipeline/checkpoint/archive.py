"""Checkpoint archives: a gzip tarball with a sha256 manifest inside and beside it, restored only once verified.

Layout of ``<label>.tar.gz``::

    ARCHIVE.json          what it holds (kind, stage, step, source, sizes); first, so it is read early
    <folder>/...          the checkpoint or export, files and folders only
    MANIFEST.sha256       sha256 of ARCHIVE.json and every file (``sha256sum`` lines); last

and beside it ``<label>.tar.gz.sha256``: the tarball's own sha256 followed by the same member lines, so
``sha256sum -c --ignore-missing X.tar.gz.sha256`` checks the tarball by hand, and after ``tar xzf``,
``sha256sum -c MANIFEST.sha256`` checks what was unpacked.

Archiving reads each file once: the member hash is computed as the bytes go into the tarball, and a
checkpoint's own ``checksums.sha256`` is checked on the way, so damage is never archived. The tarball is
written under a temporary name, fsynced and renamed. An export's own ``checksums.sha256`` is checked the same
way. Restoring reads the archive twice: first to verify everything (tarball hash, every member against both
manifests, safe names, plain files only) without writing a byte, then, once the free space is known to
suffice, to unpack into a temporary folder (verifying again what it writes), which is renamed into place;
an existing folder is never touched, and a failed restore leaves no folder it created behind. By default it
goes back where it came from (``source`` in ARCHIVE.json, when that is a plausible place: see
:func:`recorded_origin`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import struct
import tarfile
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from llm_pipeline import __version__
from llm_pipeline.checkpoint import checksums
from llm_pipeline.checkpoint.checksums import ChecksumMismatch
from llm_pipeline.checkpoint.dcp import COMMIT_MARKER, TMP_PREFIX
from llm_pipeline.checkpoint.fsio import check_free_space, fsync_path
from llm_pipeline.checkpoint.hf import read_export_manifest
from llm_pipeline.checkpoint.lock import LOCK_FILE, FolderLock, live_owner
from llm_pipeline.data.progress import progress_bar
from llm_pipeline.errors import ExplainedOSError, explain_os_error

INFO = "ARCHIVE.json"
MANIFEST = "MANIFEST.sha256"
FORMAT = 1
_CHUNK = 4 << 20
_MAX_META_BYTES = 64 << 20  # ARCHIVE.json / MANIFEST.sha256 are small; refuse to buffer a giant one


class ArchiveError(ValueError):
    """The archive is damaged, incomplete, not ours, or unsafe to unpack; nothing was written."""


@dataclass
class ArchiveInfo:
    path: Path
    info: dict[str, Any]
    members: dict[str, str]  # member name -> sha256 (files only, ARCHIVE.json included)
    sha256: str
    beside_checked: bool  # the tarball hash was compared with the .sha256 file beside it

    @property
    def folder(self) -> str:
        return str(self.info["folder"])


class _Hashing(io.RawIOBase):
    """A file wrapper that hashes every byte read or written (and reports them for progress)."""

    def __init__(self, raw: IO[bytes], on_bytes: Callable[[int], None] | None = None) -> None:
        self.raw, self.sha, self.on_bytes, self.count = raw, hashlib.sha256(), on_bytes, 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self._seen(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.raw.write(data)
        self._seen(data)
        return len(data)

    def _seen(self, data: bytes) -> None:
        self.sha.update(data)
        self.count += len(data)
        if self.on_bytes is not None:
            self.on_bytes(len(data))


def _deflate(block: bytes, level: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(block) + c.flush(zlib.Z_SYNC_FLUSH)  # byte-aligned, not final: segments concatenate


class _ParallelGzip(io.RawIOBase):
    """A gzip writer that deflates 4 MiB blocks on threads (zlib releases the GIL), as pigz does.

    Each block is an independent deflate segment ended by a sync flush, so their concatenation is one
    standard gzip member that any gunzip reads; weights barely compress, so the lost cross-block window
    costs nothing while the cores multiply the speed (one zlib stream runs at tens of MB/s).
    """

    BLOCK = 4 << 20

    def __init__(self, raw: IO[bytes], level: int, workers: int | None = None) -> None:
        self.raw, self.level = raw, level
        workers = workers or min(8, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gzip")
        self.pending: deque[Future[bytes]] = deque()
        self.window = 2 * workers
        self.buf = bytearray()
        self.crc = self.size = 0
        raw.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # magic, deflate, no name, mtime 0, OS unknown

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.buf += b
        while len(self.buf) >= self.BLOCK:
            self._submit(bytes(self.buf[: self.BLOCK]))
            del self.buf[: self.BLOCK]
        return len(b)

    def _submit(self, block: bytes) -> None:
        self.crc = zlib.crc32(block, self.crc)
        self.size += len(block)
        self.pending.append(self.pool.submit(_deflate, block, self.level))
        while len(self.pending) > self.window:
            self.raw.write(self.pending.popleft().result())

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.buf:
                self._submit(bytes(self.buf))
            while self.pending:
                self.raw.write(self.pending.popleft().result())
            self.raw.write(zlib.compressobj(self.level, zlib.DEFLATED, -15).flush())  # the empty final block
            self.raw.write(struct.pack("<II", self.crc & 0xFFFFFFFF, self.size & 0xFFFFFFFF))
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            super().close()


def sidecar(archive: Path) -> Path:
    return archive.with_name(archive.name + ".sha256")


def _label(src: Path) -> tuple[str, str, int | None, str]:
    """(kind, stage, step, label) of an archivable folder; refuses what must not be archived as is."""
    if src.name.startswith("checkpoint-") and src.name[len("checkpoint-") :].isdigit():
        if not (src / COMMIT_MARKER).is_file():
            raise ValueError(f"{src}: not committed (no {COMMIT_MARKER}): a save that never finished")
        step = int(src.name.split("-")[1])
        return "checkpoint", src.parent.name, step, f"{src.parent.name}-{src.name}"
    if any(c.name.startswith("checkpoint-") for c in src.iterdir()) or (src / LOCK_FILE).exists():
        raise ValueError(f"{src} is a stage's checkpoint folder: archive one of its checkpoints or its export")
    stage = src.name.split("_final")[0] if "_final" in src.name else src.name
    return "export", stage, None, src.name


def default_output(src: Path, label: str) -> Path:
    """``<run>/archives/<label>.tar.gz``: beside the checkpoints root, never inside it."""
    root = src.parent.parent if src.name.startswith("checkpoint-") else src.parent
    return root.parent / "archives" / f"{label}.tar.gz"


def _walk(src: Path) -> tuple[list[Path], list[Path]]:
    """Folders and files below ``src`` in a stable order; links and special files are refused."""
    dirs, files = [], []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        base = Path(dirpath)
        for d in dirnames:
            if (base / d).is_symlink():
                raise ValueError(f"{base / d}: a symbolic link (links are not archived)")
            dirs.append(base / d)
        for f in sorted(filenames):
            p = base / f
            if p.is_symlink() or not p.is_file():
                raise ValueError(f"{p}: not a regular file (links and special files are not archived)")
            if base == src and f == LOCK_FILE:
                continue
            files.append(p)
    return dirs, files


def create_archive(
    src: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    level: int = 1,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Archive a committed checkpoint or an export folder; returns (tarball, its ARCHIVE.json)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such checkpoint or export folder")
    kind, stage, step, label = _label(src)
    out = Path(output) if output else default_output(src, label)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another --output, or pass --overwrite to replace it")
    if out.resolve().is_relative_to(src.resolve()):
        raise ValueError(f"{out}: the archive must be written outside the folder it archives")
    dirs, files = _walk(src)
    sizes = {f: f.stat().st_size for f in files}
    expected = _source_manifest(src, kind)
    total = sum(sizes.values())
    # Weights barely compress: the tarball is about the folder's size.
    check_free_space(out.parent, total + (1 << 20), out.name, "Free some space or pass --output on a larger disk")
    info = {
        "format": FORMAT, "kind": kind, "stage": stage, "step": step, "folder": src.name,
        "source": os.path.abspath(src), "created": time.time(), "llm_pipeline_version": __version__,
        "files": len(files), "bytes": total, "source_checksums": expected is not None,
    }  # fmt: skip
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    sums: dict[str, str] = {}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(tmp, "wb") as raw,
            progress_bar(f"archive {label}", total=total, enabled=progress, unit="bytes") as bar,
        ):
            hashed = _Hashing(raw)
            with (
                _ParallelGzip(hashed, level) as gz,  # type: ignore[arg-type]
                tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar,  # type: ignore[arg-type]
            ):
                blob = (json.dumps(info, indent=2) + "\n").encode()
                sums[INFO] = hashlib.sha256(blob).hexdigest()
                _add_bytes(tar, INFO, blob)
                top = tar.gettarinfo(str(src), arcname=src.name)
                tar.addfile(_clean(top))
                for d in dirs:
                    tar.addfile(_clean(tar.gettarinfo(str(d), arcname=f"{src.name}/{d.relative_to(src).as_posix()}")))
                for f in files:
                    name = f"{src.name}/{f.relative_to(src).as_posix()}"
                    ti = _clean(tar.gettarinfo(str(f), arcname=name))
                    ti.size = sizes[f]
                    with open(f, "rb") as fh:
                        reader = _Hashing(fh, bar.advance)
                        tar.addfile(ti, reader)
                    sums[name] = reader.sha.hexdigest()
                    own = f.relative_to(src).as_posix()
                    if expected is not None and own in expected and expected[own] != sums[name]:
                        raise ChecksumMismatch(
                            f"{f}: differs from the {kind}'s {checksums.MANIFEST}; it was damaged after it was "
                            "written, so it is not archived (llm-pipeline ckpt verify lists the damage)"
                        )
                _add_bytes(tar, MANIFEST, checksums.format_manifest(sums).encode())
            raw.flush()
            os.fsync(raw.fileno())
        digest = hashed.sha.hexdigest()
        side_tmp = sidecar(tmp)
        side_tmp.write_text(f"{digest}  {out.name}\n" + checksums.format_manifest(sums), encoding="utf-8")
        with open(side_tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} appeared while archiving; nothing was replaced")
        os.replace(tmp, out)
        os.replace(side_tmp, sidecar(out))
        fsync_path(out.parent)
    except OSError as e:  # a full disk or a failing one: say which archive, where
        if e.errno is None or isinstance(e, ExplainedOSError):
            raise
        raise ExplainedOSError(e.errno, explain_os_error(e, f"archiving {src} into {out.parent}")) from None
    finally:
        for p in (tmp, sidecar(tmp)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return out, info | {"sha256": digest, "archive_bytes": out.stat().st_size}


def _source_manifest(src: Path, kind: str) -> dict[str, str] | None:
    """The checkpoint's or export's own checksums, every listed file present: damage is never archived."""
    try:
        expected = checksums.read_manifest(src) if kind == "checkpoint" else read_export_manifest(src)
    except ChecksumMismatch as e:
        raise ChecksumMismatch(f"{src}: {e}; it is not archived (llm-pipeline ckpt verify lists the damage)") from None
    missing = sorted(n for n in expected or {} if not (src / n).is_file())
    if missing:
        raise ChecksumMismatch(
            f"{src}: {', '.join(missing[:3])} listed in its {checksums.MANIFEST} but missing; it is not archived"
        )
    return expected


def _clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    """No owner names or ids: an archive restores as the user who unpacks it."""
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), int(time.time()), 0o644
    tar.addfile(ti, io.BytesIO(data))


# --------------------------------------------------------------------------------------------
# Verifying and restoring
# --------------------------------------------------------------------------------------------


def _safe_name(name: str, folder: str | None) -> str:
    """The member's path, or an ArchiveError when unpacking it could write outside the target folder."""
    norm = posixpath.normpath(name)
    parts = norm.split("/")
    if (
        not name
        or "\x00" in name
        or "\\" in name
        or name.startswith("/")
        or norm.startswith("../")
        or ".." in parts
        or norm in (".", "..")
    ):
        raise ArchiveError(f"unsafe member path {name!r} (absolute, '..' or odd characters)")
    if norm in (INFO, MANIFEST):
        return norm
    if folder is None or parts[0] != folder:
        raise ArchiveError(f"member {name!r} is outside the archived folder {folder!r}")
    return norm


def _members(
    fileobj: IO[bytes], sink: Callable[[tarfile.TarInfo, str], IO[bytes] | None] | None = None
) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """Walk a tarball once: (ARCHIVE.json, its MANIFEST, the sha256 computed of every file member).

    ``sink(member, name)`` may return a file to copy the member's bytes into (restoring); every name and
    type is checked before any byte of a member is used.
    """
    info: dict[str, Any] | None = None
    manifest: dict[str, str] | None = None
    computed: dict[str, str] = {}
    seen: set[str] = set()
    with gzip.GzipFile(fileobj=fileobj, mode="rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
        for m in tar:
            name = _safe_name(m.name, info["folder"] if info else None)
            if info is None and name != INFO:
                raise ArchiveError(f"first member is {m.name!r}, not {INFO}: not an llm-pipeline checkpoint archive")
            if name in seen:
                raise ArchiveError(f"member {name!r} appears twice")
            seen.add(name)
            if manifest is not None:
                raise ArchiveError(f"member {name!r} after {MANIFEST}")
            if m.isdir():
                if sink is not None:
                    sink(m, name)
                continue
            if not m.isfile():
                raise ArchiveError(f"member {name!r} is a link or special file; only files and folders are restored")
            src = tar.extractfile(m)
            assert src is not None
            if name in (INFO, MANIFEST):
                if m.size > _MAX_META_BYTES:
                    raise ArchiveError(f"{name} is implausibly large ({m.size} bytes)")
                blob = src.read()
                computed[name] = hashlib.sha256(blob).hexdigest()
                try:
                    if name == INFO:
                        info = json.loads(blob)
                        if not isinstance(info, dict) or info.get("format") != FORMAT or "folder" not in info:
                            raise ArchiveError(f"{INFO}: not a format-{FORMAT} checkpoint archive description")
                        folder = str(info["folder"])
                        if not folder or any(c in folder for c in "/\\\x00") or folder in (".", ".."):
                            raise ArchiveError(f"{INFO}: unsafe folder name {folder!r}")
                    else:
                        manifest = checksums.parse_manifest(blob.decode("utf-8"), Path(MANIFEST))
                except (ValueError, UnicodeDecodeError, ChecksumMismatch) as e:
                    raise ArchiveError(f"{name}: unreadable ({e})") from None
                continue
            out = sink(m, name) if sink is not None else None
            sha = hashlib.sha256()
            while block := src.read(_CHUNK):
                sha.update(block)
                if out is not None:
                    out.write(block)
            computed[name] = sha.hexdigest()
        while gz.read(_CHUNK):  # to the end of the gzip stream, so its CRC and length are checked too
            pass
    if info is None or manifest is None:
        raise ArchiveError(f"no {INFO if info is None else MANIFEST}: incomplete or not an llm-pipeline archive")
    while fileobj.read(_CHUNK):  # anything after the gzip stream still counts towards the tarball's hash
        pass
    return info, manifest, computed


def _compare(manifest: dict[str, str], computed: dict[str, str], beside: dict[str, str] | None) -> None:
    computed = {k: v for k, v in computed.items() if k != MANIFEST}
    problems = [f"{n}: not in the archive" for n in sorted(set(manifest) - set(computed))]
    problems += [f"{n}: not in the manifest" for n in sorted(set(computed) - set(manifest))]
    problems += [
        f"{n}: sha256 {computed[n][:12]}... differs from the manifest's {manifest[n][:12]}..."
        for n in sorted(set(manifest) & set(computed))
        if manifest[n] != computed[n]
    ]
    if beside is not None and beside != manifest:
        problems.append("the member list beside the archive differs from the one inside it")
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ArchiveError("; ".join(problems[:3]) + more)


def verify_archive(archive: str | os.PathLike[str], *, progress: bool = True) -> ArchiveInfo:
    """Check an archive completely without writing anything; raises :class:`ArchiveError` naming the damage."""
    path = Path(archive)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such archive")
    side = sidecar(path)
    beside_sum, beside = None, None
    if side.is_file():
        try:
            lines = checksums.parse_manifest(side.read_text(encoding="utf-8"), side)
        except (ChecksumMismatch, UnicodeDecodeError, OSError) as e:
            raise ArchiveError(f"{path}: the checksum file beside it is unreadable ({e})") from None
        beside_sum = lines.pop(path.name, None)
        if beside_sum is None:
            raise ArchiveError(f"{side} has no line for {path.name} (renamed archive?)")
        beside = lines
    try:
        info, manifest, computed, digest = _read(path, None, progress, "verify")
    except ArchiveError as e:
        raise ArchiveError(f"{path}: {e}; the archive is refused") from None
    if beside_sum is not None and beside_sum != digest:
        raise ArchiveError(
            f"{path}: sha256 {digest[:12]}... differs from {side.name}'s {beside_sum[:12]}...: the tarball changed "
            "after it was written; the archive is refused"
        )
    try:
        _compare(manifest, computed, beside)
    except ArchiveError as e:
        raise ArchiveError(f"{path}: {e}; the archive is refused") from None
    return ArchiveInfo(path, info, manifest, digest, beside_sum is not None)


def _read(
    path: Path, sink: Callable[[tarfile.TarInfo, str], IO[bytes] | None] | None, progress: bool, what: str
) -> tuple[dict[str, Any], dict[str, str], dict[str, str], str]:
    with (
        open(path, "rb") as raw,
        progress_bar(f"{what} {path.name}", total=path.stat().st_size, enabled=progress, unit="bytes") as bar,
    ):
        hashed = _Hashing(raw, bar.advance)
        try:
            info, manifest, computed = _members(hashed, sink)  # type: ignore[arg-type]
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ArchiveError(f"corrupted or truncated ({type(e).__name__}: {e})") from None
    return info, manifest, computed, hashed.sha.hexdigest()


def default_destination(info: dict[str, Any], root: Path) -> Path:
    """Where a checkpoint goes back to: ``<root>/<stage>/checkpoint-<step>``; an export: ``<root>/<folder>``."""
    if info.get("kind") == "checkpoint":
        return root / str(info["stage"]) / str(info["folder"])
    return root / str(info["folder"])


def recorded_origin(info: dict[str, Any]) -> Path | None:
    """The folder an archive was made from (ARCHIVE.json ``source``), when it is safe to write there again.

    An archive may come from anyone, so its word is taken only for a plausible place: a normalised path (older
    archives recorded it relative to where ``archive`` ran, read here against the working directory) without
    hidden parts, ending in the archived folder (a checkpoint: ``<stage>/checkpoint-<step>``) under a
    checkpoints root that still exists. Otherwise None, and the caller uses ``./checkpoints``.
    """
    source = info.get("source")
    if not isinstance(source, str) or not source or "\x00" in source:
        return None
    path = Path(os.path.abspath(source))
    if path.name != str(info.get("folder")) or any(part.startswith(".") for part in path.parts[1:]):
        return None
    root = path.parent
    if info.get("kind") == "checkpoint":
        if path.parent.name != str(info.get("stage")):
            return None
        root = path.parent.parent
    return path if root.is_dir() else None


def restore_archive(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str] | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """Verify ``archive`` completely, then unpack it into ``dest`` (which must not exist); returns ``dest``.

    Without ``dest``: under ``root`` when one is given, else where the archive came from
    (:func:`recorded_origin`), else under ``./checkpoints``. The free space is checked before the first byte is
    written; a failure names the folder and leaves no folder behind that the restore created.
    """
    checked = verify_archive(archive, progress=progress)
    if dest:
        target = Path(dest)
    elif root is not None:
        target = default_destination(checked.info, Path(root))
    else:
        target = recorded_origin(checked.info) or default_destination(checked.info, Path("checkpoints"))
    if target.exists():
        raise FileExistsError(f"{target} already exists: restore never replaces a folder (pass --to NEW_FOLDER)")
    size = checked.info.get("bytes")
    needed = (size if isinstance(size, int) and size > 0 else 0) + (1 << 20)
    check_free_space(target.parent, needed, target.name, "Free some space or restore elsewhere with --to")
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # deepest first
    done = False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _restore_into(checked, target, progress)
        done = True
    except OSError as e:  # a disk filling up meanwhile, a read-only folder: say where
        if e.errno is None or isinstance(e, ExplainedOSError | FileExistsError):
            raise
        raise ExplainedOSError(e.errno, explain_os_error(e, f"restoring into {target.parent}")) from None
    finally:
        if not done:
            for folder in created:  # a stage or run folder made for this restore goes again
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return target


def _restore_into(checked: ArchiveInfo, target: Path, progress: bool) -> None:
    owner = live_owner(target.parent)
    if owner is not None:
        raise RuntimeError(f"{target.parent} is in use by {owner.describe()}: restore after that run stops")
    checkpoint_home = checked.info.get("kind") == "checkpoint" and target.name.startswith("checkpoint-")
    lock = FolderLock(target.parent, purpose="checkpoint restore") if checkpoint_home else contextlib.nullcontext()
    # In a stage folder the temporary folder carries the interrupted-save prefix, so a later run clears it.
    name = f"{TMP_PREFIX}restore-{target.name}-{os.getpid()}" if checkpoint_home else None
    tmp = target.parent / (name or f".{target.name}.tmp-{os.getpid()}-restore")  # hf.py's leftover naming
    with lock:
        try:
            _unpack(checked, tmp, progress)
            if target.exists():
                raise FileExistsError(f"{target} appeared while restoring; nothing was replaced")
            tmp.rename(target)
            fsync_path(target.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _unpack(checked: ArchiveInfo, tmp: Path, progress: bool) -> None:
    """Second pass: write every member below ``tmp`` and check again that the bytes are the verified ones."""
    folder = checked.folder
    opened: list[IO[bytes]] = []
    dir_times: list[tuple[Path, tarfile.TarInfo]] = []

    def sink(m: tarfile.TarInfo, name: str) -> IO[bytes] | None:
        while opened:
            _finish(opened.pop())
        rel = name[len(folder) :].lstrip("/")
        path = tmp / rel if rel else tmp
        if m.isdir():
            path.mkdir(parents=True, exist_ok=True)
            dir_times.append((path, m))
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "xb")  # noqa: SIM115 - closed by _finish
        fh.member = m  # type: ignore[attr-defined]
        opened.append(fh)
        return fh

    def _finish(fh: IO[bytes]) -> None:
        m = fh.member  # type: ignore[attr-defined]
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.chmod(fh.name, m.mode & 0o777)
        os.utime(fh.name, (m.mtime, m.mtime))

    tmp.mkdir()
    try:
        _, manifest, computed, digest = _read(checked.path, sink, progress, "restore")
        while opened:
            _finish(opened.pop())
    finally:
        for fh in opened:
            fh.close()
    if digest != checked.sha256 or manifest != checked.members:
        raise ArchiveError(f"{checked.path}: changed while it was being restored; nothing was restored")
    _compare(manifest, computed, None)
    for path, m in reversed(dir_times):
        os.chmod(path, (m.mode & 0o777) | 0o700)
        os.utime(path, (m.mtime, m.mtime))
        fsync_path(path)
