"""DPO's reference log-probs: one pass of the frozen start model over every pair, cached beside the run.

The reference model of DPO is the start model, and it never changes, so its summed log-probs of
each pair's chosen and rejected completions are computed once (:func:`compute_reference_logps`)
under the run's own parallel setup: with FSDP2 every rank scores its share of the pairs, every rank
runs the same number of forwards (filler rows make up the difference), and an all-gather gives
every rank the whole table. The pass orders pairs longest first so micro-batches carry little padding.

Each split's table is stored as ``<output_dir>/reference/<key>.pt`` (+ ``<key>.json`` saying what
it was computed from), written atomically on rank 0. The key is a sha256 of the start model (its
``config.json`` and weight files, or a preset's config and seed), its tokenizer files, the split's
data fingerprint (token ids and masks, so every length setting and template change is included),
the length settings themselves, the precision and float8. A resumed or repeated run with the same
key loads the file instead of recomputing it; a file whose stored key, pair count or contents do
not match is never used (it is recomputed and replaced).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from llm_pipeline.checkpoint.fsio import replace_synced
from llm_pipeline.data.preference import PreferenceBatchSource
from llm_pipeline.data.progress import progress_bar
from llm_pipeline.hashing import bytes_digest, files_digest
from llm_pipeline.train.dpo_loss import REF_CHOSEN, REF_REJECTED, sequence_logps
from llm_pipeline.train.parallel import DistInfo, any_rank, reshard_all
from llm_pipeline.train.trainer import training_autocast

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass
class ReferenceLogps:
    """Summed log-probs of the start model over each pair's completion tokens, indexed by pair id (fp32)."""

    chosen: torch.Tensor  # [pairs]
    rejected: torch.Tensor  # [pairs]

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    def attach_to(self, source: PreferenceBatchSource) -> None:
        """Every batch of ``source`` carries the rows' reference log-probs from now on."""
        source.attach(**{REF_CHOSEN: self.chosen, REF_REJECTED: self.rejected})


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


def pass_plan(lengths: np.ndarray, micro_batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of pair ids (-1 = filler), longest pairs first; equal count on every rank."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    block = micro_batch_size * world_size
    padded = np.full(max(1, math.ceil(len(order) / block)) * block, -1, np.int64)
    padded[: len(order)] = order
    start = rank * micro_batch_size
    return [padded[b + start : b + start + micro_batch_size].tolist() for b in range(0, len(padded), block)]


@torch.no_grad()
def compute_reference_logps(
    model: nn.Module,
    source: PreferenceBatchSource,
    info: DistInfo,
    *,
    micro_batch_size: int,
    precision: str,
    chunk_tokens: int,
    description: str = "reference",
) -> ReferenceLogps:
    """Score every pair of ``source`` with ``model`` (the start weights); collective under FSDP."""
    lengths = np.maximum(source.pairs.chosen.lengths, source.pairs.rejected.lengths)
    plan = pass_plan(lengths, micro_batch_size, info.world_size, info.rank)
    rows: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with progress_bar(f"{description} log-probs", total=len(plan), enabled=info.is_main) as bar:
            for ids in plan:
                batch = {k: v.to(info.device) for k, v in source.collate_pairs(ids).items()}
                with training_autocast(model, precision, info.device):
                    chosen, rejected, _, _ = sequence_logps(model, batch, chunk_tokens=chunk_tokens)
                ids_t = batch["pair_ids"].to(torch.float64)
                rows.append(torch.stack([ids_t, chosen.double(), rejected.double()], dim=1))
                bar.advance(1)
    finally:
        model.train(was_training)
        # FSDP2 keeps blocks that do not reshard after forward (the last one) gathered until a backward
        # that never comes here; an optimizer built now would hold those unsharded tensors.
        reshard_all(model)
    local = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64, device=info.device)
    if info.distributed:
        parts = [torch.empty_like(local) for _ in range(info.world_size)]
        dist.all_gather(parts, local)
        local = torch.cat(parts)
    table = local[local[:, 0] >= 0].cpu()
    n = len(source.pairs)
    ids = table[:, 0].long()
    if ids.numel() != n or torch.bincount(ids, minlength=n).ne(1).any():
        raise RuntimeError(f"{description} pass scored {ids.numel()} rows for {n} pairs: a pair is missing or repeated")
    chosen = torch.zeros(n, dtype=torch.float32)
    rejected = torch.zeros(n, dtype=torch.float32)
    chosen[ids], rejected[ids] = table[:, 1].float(), table[:, 2].float()
    return ReferenceLogps(chosen, rejected)


# --------------------------------------------------------------------------------------------
# The key
# --------------------------------------------------------------------------------------------


def tokenizer_digest(tokenizer_dir: Path | None) -> str | None:
    """sha256 of the tokenizer and chat-template files the pairs were encoded with."""
    if tokenizer_dir is None:
        return None
    from llm_pipeline.checkpoint.hf import TOKENIZER_FILES

    root = Path(tokenizer_dir)
    return files_digest([root / f for f in TOKENIZER_FILES if (root / f).is_file()], root)


def reference_key(components: Mapping[str, Any]) -> str:
    """The cache key: sha256 of the components (model, tokenizer, data, lengths, precision) as sorted JSON."""
    return bytes_digest(json.dumps(dict(components), sort_keys=True, default=str))


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


@dataclass
class ReferenceCache:
    """One split's table: ``<directory>/<key[:32]>.pt``, and ``.json`` saying what it was computed from."""

    directory: Path
    key: str
    components: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.directory / f"{self.key[:32]}.pt"

    @property
    def meta_path(self) -> Path:
        return self.path.with_suffix(".json")

    def load(self, pairs: int) -> ReferenceLogps | None:
        """The stored table if the file is there and matches this key and this pair count, else None."""
        if not self.path.is_file():
            return None
        try:
            table, problem = self._read(pairs)
        except Exception as e:  # a torn or foreign file is never trusted: it is recomputed
            table, problem = None, f"unreadable ({type(e).__name__}: {e})"
        if problem is not None:
            log.warning("reference cache %s does not match this run (%s): recomputing it", self.path, problem)
        return table

    def _read(self, pairs: int) -> tuple[ReferenceLogps | None, str | None]:
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("format") != CACHE_FORMAT or state.get("key") != self.key:
            return None, f"its key {str(state.get('key'))[:16]}... is not this run's {self.key[:16]}..."
        chosen, rejected = state["chosen"].float(), state["rejected"].float()
        if chosen.shape != (pairs,) or rejected.shape != (pairs,):
            return None, f"it has {tuple(chosen.shape)} / {tuple(rejected.shape)} rows for {pairs} pairs"
        if not (chosen.isfinite().all() and rejected.isfinite().all()):
            return None, "it holds non-finite values"
        return ReferenceLogps(chosen, rejected), None

    def save(self, table: ReferenceLogps, *, seconds: float, world_size: int) -> Path:
        """Write the table and its description atomically (rank 0 only)."""
        state = {"format": CACHE_FORMAT, "key": self.key, "chosen": table.chosen, "rejected": table.rejected}
        buf = io.BytesIO()
        torch.save(state, buf)
        try:
            replace_synced(self.path, lambda f: f.write(buf.getvalue()))
        except OSError as e:  # a full disk, a read-only folder: say which folder, not only the errno
            raise OSError(
                e.errno,
                f"could not write the DPO reference log-probs ({len(buf.getvalue()):,} bytes) into {self.directory}: "
                f"{e.strerror or e}; free space there or move training.output_dir",
            ) from e
        meta = {
            "key": self.key,
            "components": self.components,
            "pairs": len(table),
            "seconds": round(seconds, 3),
            "world_size": world_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        text = json.dumps(meta, indent=2, default=str) + "\n"
        try:
            replace_synced(self.meta_path, lambda f: f.write(text.encode()))
        except OSError as e:
            raise OSError(e.errno, f"could not write {self.meta_path}: {e.strerror or e}") from e
        return self.path


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>`` files left in the cache folder by writers that no longer run (a kill -9
    during a save); a live writer's temp file is left alone. Returns what was removed."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _pid_running(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            continue
    if removed:
        log.info("reference cache: removed %d temp file(s) of interrupted writes in %s", len(removed), directory)
    return removed


def _pid_running(pid: int) -> bool:
    import os

    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _broadcast_table(table: ReferenceLogps | None, pairs: int, info: DistInfo) -> ReferenceLogps:
    """Rank 0's table on every rank (no shared file system needed)."""
    flat = torch.cat([table.chosen, table.rejected]) if table is not None else torch.zeros(2 * pairs)
    flat = flat.to(info.device)
    dist.broadcast(flat, src=0)
    flat = flat.cpu()
    return ReferenceLogps(flat[:pairs].clone(), flat[pairs:].clone())


def load_or_compute_reference(
    model: nn.Module,
    sources: Mapping[str, PreferenceBatchSource],
    info: DistInfo,
    *,
    cache_dir: Path,
    components: Callable[[], dict[str, Any]],
    micro_batch_size: int,
    precision: str,
    chunk_tokens: int,
) -> tuple[dict[str, ReferenceLogps], dict[str, Any]]:
    """Each split's reference table, from the cache when its key matches, else computed and stored.

    A split's key covers ``components()`` (what every split shares: start model, tokenizer, lengths,
    precision) and that split's data fingerprint, so a run that turns evaluation on later only scores the
    validation pairs. Collective: rank 0 alone evaluates the components (hashing the start model's files)
    and reads the cache; keys, hits and loaded tables are broadcast, and every rank takes part in a pass.
    Returns the tables and a report: ``keys``/``paths`` per split, ``loaded`` (every split came from the
    cache), ``computed`` (the splits scored now) and ``seconds``.
    """
    start = time.perf_counter()
    parts: list[Any] = [None]
    if info.is_main:
        remove_stale_temp_files(Path(cache_dir))
        common = components()
        parts = [{split: {**common, "split": split, "data": src.fingerprint()} for split, src in sources.items()}]
    if info.distributed:
        dist.broadcast_object_list(parts, src=0)
    caches = {split: ReferenceCache(Path(cache_dir), reference_key(c), c) for split, c in parts[0].items()}
    tables: dict[str, ReferenceLogps] = {}
    computed: list[str] = []
    for split, src in sources.items():
        cache, pairs = caches[split], len(src.pairs)
        found = cache.load(pairs) if info.is_main else None
        if any_rank(found is not None, info.device):
            tables[split] = _broadcast_table(found, pairs, info) if info.distributed else found  # type: ignore[assignment]
            log.info("reference log-probs (%s): loaded %s (%d pairs)", split, cache.path, pairs)
            continue
        t0 = time.perf_counter()
        tables[split] = compute_reference_logps(
            model, src, info, micro_batch_size=micro_batch_size, precision=precision, chunk_tokens=chunk_tokens,
            description=f"reference ({split})",
        )  # fmt: skip
        computed.append(split)
        if info.is_main:
            cache.save(tables[split], seconds=time.perf_counter() - t0, world_size=info.world_size)
            log.info(
                "reference log-probs (%s): %d pairs in %.1fs -> %s", split, pairs, time.perf_counter() - t0, cache.path
            )
    report = {
        "keys": {split: c.key for split, c in caches.items()},
        "paths": {split: str(c.path) for split, c in caches.items()},
        "loaded": not computed,
        "computed": computed,
        "seconds": time.perf_counter() - start,
    }
    return tables, report
