"""The one hashing module: values equal the helpers it replaced (no stored fingerprint changes), and
digests follow content, not paths or modification times."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from llm_pipeline.hashing import (
    bytes_digest,
    file_sha256,
    files_digest,
    folder_digest,
    hash64,
    short_hash,
    stable_hash,
)


def test_values_equal_the_replaced_helpers(tmp_path: Path) -> None:
    """Manifests, checkpoints' checksums and data fingerprints written before keep matching."""
    parts = ("pack", {"b": 1, "a": [1, 2]}, "x" * 3)
    old = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()
    assert stable_hash(*parts) == old
    assert short_hash({"lr": 1e-3}) == stable_hash({"lr": 1e-3})[:16]

    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(3 << 20))
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert file_sha256(f, chunk=1000) == file_sha256(f)

    arrays = [np.arange(10, dtype=np.int64), np.ones(3, dtype=np.int32)[::1]]
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    assert bytes_digest(*(np.ascontiguousarray(a).data for a in arrays)) == h.hexdigest()
    assert bytes_digest("ab", "c") == hashlib.sha256(b"abc").hexdigest()

    for text in ("", "os.path.join", "Ünïcödé 🚀", "7:doc-12"):
        old64 = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        assert hash64(text) == old64
    assert isinstance(hash64("\ud800"), int)  # a lone surrogate (bad input text) still hashes

    (tmp_path / "d").mkdir()
    for name in ("b.json", "a.txt"):
        (tmp_path / "d" / name).write_text(name)
    old_files = hashlib.sha256()
    for p in sorted((tmp_path / "d").iterdir()):
        old_files.update(p.name.encode() + b"\0" + p.read_bytes())
    assert files_digest((tmp_path / "d").iterdir(), tmp_path / "d") == old_files.hexdigest()


def _model(folder: Path, scale: float = 1.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_file({"w": torch.randn(8, 4) * scale, "b": torch.zeros(4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_folder_digest_ignores_mtime_sees_bytes(tmp_path: Path) -> None:
    d = _model(tmp_path / "export")
    first = folder_digest(d)
    os.utime(d / "model.safetensors", ns=(1, 1))  # rewritten with the same bytes: same export
    assert folder_digest(d) == first
    (d / "config.json").write_text(json.dumps({"hidden_size": 5}))
    assert folder_digest(d) != first
    assert folder_digest(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert folder_digest(tmp_path / "empty") is None
    assert folder_digest(d, patterns=["*.json"]) != folder_digest(d)
