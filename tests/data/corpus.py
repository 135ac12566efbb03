"""Synthetic corpora built by the tests themselves (offline, deterministic)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

WORDS = [f"{a}{b}{c}" for a in "bcdfgklmnprstvz" for b in "aeiou" for c in ("", "n", "r", "s", "l", "x", "th")]


def random_doc(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    lines = [" ".join(words[i : i + 12]) + "." for i in range(0, n_words, 12)]
    return "\n".join(lines)


def edit_words(rng: random.Random, text: str, fraction: float) -> str:
    """Replace ``fraction`` of the words (scattered) by random other words, keeping line structure."""
    lines = [line.split(" ") for line in text.split("\n")]
    slots = [(i, j) for i, line in enumerate(lines) for j in range(len(line))]
    for i, j in rng.sample(slots, round(fraction * len(slots))):
        lines[i][j] = rng.choice(WORDS) + "q"
    return "\n".join(" ".join(line) for line in lines)


def planted_duplicates_corpus(
    seed: int = 0, n_unique: int = 160, n_exact: int = 20, n_near: int = 40, edit_fraction: float = 0.1
) -> tuple[list[dict], dict[str, str]]:
    """Unique documents plus exact copies and ~10%-word-edited near copies; returns (records, planted id -> kind)."""
    rng = random.Random(seed)
    originals = [{"id": f"u{i:04d}", "text": random_doc(rng, rng.randint(150, 400))} for i in range(n_unique)]
    planted: dict[str, str] = {}
    records = list(originals)
    for k in range(n_exact):
        src = rng.choice(originals)
        records.append({"id": f"x{k:04d}", "text": src["text"]})
        planted[f"x{k:04d}"] = "exact"
    for k in range(n_near):
        src = rng.choice(originals)
        records.append({"id": f"y{k:04d}", "text": edit_words(rng, src["text"], edit_fraction)})
        planted[f"y{k:04d}"] = "near"
    rng.shuffle(records)
    return records, planted


def write_jsonl(path: Path, records: list[dict], *, compress: bool | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if (compress or path.name.endswith(".gz")) else data)
    return path
