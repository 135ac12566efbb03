"""Training checkpoints: sharded DCP folders committed atomically, kept N deep, resumed exactly.

One folder per step, ``<output_dir>/checkpoint-<step>/``:

- DCP files (``.metadata``, ``__<rank>_0.distcp``): model and optimizer, sharded as trained
  (FSDP2 DTensors or plain tensors; a checkpoint loads on another world size);
- ``trainer_state.pt``: step, scheduler, curriculum, counters (rank 0);
- ``rank_<r>.pt``: that rank's data-loader position and RNG states;
- ``config.yaml`` (the resolved run config) and ``meta.json``;
- ``checksums.sha256``: sha256 of every file above (``sha256sum -c`` format), checked before a resume;
- ``COMMITTED``: written last. A folder without it is not a checkpoint.

Everything is written into ``.tmp-checkpoint-<step>``, fsynced, then renamed into place, so a
crash at any moment leaves either the previous checkpoints or a complete new one. Old checkpoints
are renamed away (``.pruned-checkpoint-<step>``) before their files are deleted, so a crash while
pruning never leaves a half-deleted folder that still looks committed. Whatever a crash leaves
behind is cleared the next time a run opens the folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from pydantic import BaseModel
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from llm_pipeline.checkpoint import checksums
from llm_pipeline.checkpoint.checksums import ChecksumMismatch
from llm_pipeline.checkpoint.fsio import check_free_space, fsync_path, human_bytes, write_text_synced
from llm_pipeline.checkpoint.lock import FolderLock, FolderLocked
from llm_pipeline.config import ConfigError, ModelConfig, config_to_dict, save_config
from llm_pipeline.errors import ExplainedOSError, explain_os_error, find_os_error, iter_causes
from llm_pipeline.train import parallel

log = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-" + PREFIX  # a save in progress
OLD_PREFIX = ".old-"  # a committed checkpoint moved aside while its step is saved again
PRUNED_PREFIX = ".pruned-"  # an old checkpoint being deleted
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")
_FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk filled up
_PER_TENSOR_BYTES = 4096  # DCP's per-tensor overhead in the shard files and .metadata, generously


# The project's one set of collectives (train/parallel.py), under the short names this module uses.
_dist, _rank, _world = parallel.is_distributed, parallel.rank, parallel.world_size
_barrier, _all_sum, _any_rank = parallel.barrier, parallel.sum_over_ranks, parallel.any_rank


# One process without a process group is an intended case here (DCP also for single-process runs);
# DCP warns about it on every save/load, including from the background thread of an async save.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled", category=UserWarning, module="torch.distributed.checkpoint"
)


def _torch_save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_path(root: str | os.PathLike[str], step: int) -> Path:
    return Path(root) / f"{PREFIX}{step}"


#: Files that make a folder a model (an HF directory, a LoRA adapter, one of our exports), not a training output.
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json",
               "llm_pipeline.json")  # fmt: skip


def check_training_output_dir(path: str | os.PathLike[str]) -> None:
    """Refuse a training ``output_dir`` that is an existing model folder (``init_from``, an export...).

    Training writes ``config.yaml``, logs, caches and ``checkpoint-<step>`` folders into its output folder;
    among a model's files they would mix two things, and a later export over it is refused. Raises a
    one-line ``FileExistsError`` naming the folder and the fix.
    """
    p = Path(path)
    if not p.is_dir() or list_checkpoints(p):
        return
    found = [f for f in MODEL_FILES if (p / f).is_file()]
    if found:
        raise ExplainedOSError(
            errno.EEXIST,
            f"{p} is a model folder ({', '.join(found)}), not a training output folder: training would write its "
            f"checkpoints, logs and config.yaml among the model's files. Set training.output_dir (--output_dir) to "
            f"a new folder such as {p.with_name(p.name + '_run')}; to start from this model, set model.init_from",
        )


def is_committed(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / COMMIT_MARKER).is_file()


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Committed checkpoints under ``root`` as (step, path), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and is_committed(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest committed checkpoint, ignoring partial folders from a crash."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(value: str | None, output_dir: str | os.PathLike[str]) -> Path | None:
    """``None`` -> fresh start; ``auto`` -> newest valid checkpoint or fresh start; else that folder (validated)."""
    if value is None or value == "":
        return None
    if value == "auto":
        path = latest_checkpoint(output_dir)
        if path is None:
            log.info("resume_from_checkpoint=auto: no committed checkpoint in %s, starting fresh", output_dir)
        return path
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such checkpoint folder")
    if not is_committed(path):
        raise ValueError(
            f"--resume_from_checkpoint {path}: no {COMMIT_MARKER} marker, so this save never finished; "
            f"use 'auto' to take the newest complete checkpoint"
        )
    return path


def read_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    return torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and loads training state for every rank; all methods are collective.

    While open, rank 0 holds a :class:`~llm_pipeline.checkpoint.lock.FolderLock` on ``root`` so two
    runs never write into one folder; :meth:`close` (or interpreter exit) gives it back. Opening also
    clears what a crash left behind (partial saves, interrupted pruning or exports). Every save
    writes a checksum manifest; ``verify_checksums`` checks it before a checkpoint is loaded.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int = 3,
        async_save: bool = False,
        verify_checksums: bool = True,
        lock: bool = True,
        final_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self.verify_checksums = verify_checksums
        self._pending: tuple[Future, Path, Path, int] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._async_group = None
        self._lock: FolderLock | None = None
        self._finalizer: weakref.finalize | None = None
        if async_save and _dist():
            # Background writes must not share a communicator with the training collectives.
            self._async_group = dist.new_group(backend="gloo")
        error: Exception | None = None
        if _rank() == 0:
            try:
                check_training_output_dir(self.root)
                self.root.mkdir(parents=True, exist_ok=True)
                if lock:
                    self._lock = FolderLock(self.root, purpose="training run").acquire()
                    self._finalizer = weakref.finalize(self, self._lock.release)
                clean_leftovers(self.root)
                from llm_pipeline.checkpoint.hf import clean_export_leftovers

                clean_export_leftovers(Path(final_dir) if final_dir else self.root.with_name(self.root.name + "_final"))
            except OSError as e:
                error = ExplainedOSError(e.errno or 0, explain_os_error(e, "cannot use the checkpoint folder"))
            except FolderLocked as e:
                error = e
        if _any_rank(error is not None):
            raise error or RuntimeError(f"{self.root}: rank 0 could not open the checkpoint folder (see its error)")

    # ---- saving ----------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        trainer_state: Mapping[str, Any],
        rank_state: Mapping[str, Any],
        config: BaseModel | None = None,
        model_config: ModelConfig | None = None,
        save_frozen_params: bool = True,
    ) -> Path:
        """Write ``checkpoint-<step>``; with ``async_save`` the commit happens in :meth:`wait`.

        ``model_config`` goes into ``meta.json`` so the weights can be rebuilt without the run config.
        ``save_frozen_params=False`` keeps frozen weights out (a LoRA run saves its adapters only).
        A save that cannot complete (disk full, read-only folder...) raises one actionable error and
        leaves the previous checkpoints as they were.
        """
        self.wait()
        tmp = self.root / f"{TMP_PREFIX}{step}"
        final = checkpoint_path(self.root, step)
        options = StateDictOptions(ignore_frozen_params=not save_frozen_params)
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
            state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        else:
            state = {"model": get_model_state_dict(model, options=options)}
        self._prepare(tmp, step, _all_sum(_nbytes(state)))
        error: Exception | None = None
        try:
            _torch_save_synced(dict(rank_state), tmp / f"rank_{_rank()}.pt")
            if _rank() == 0:
                extra = {"frozen_params_saved": save_frozen_params}
                self._write_rank0_files(tmp, step, trainer_state, config, model_config, extra)
        except Exception as e:
            error = e
        self._agree_or_fail(error, tmp, step)
        if self.async_save:
            fut = dcp.async_save(state, checkpoint_id=tmp, process_group=self._async_group)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-checksums")
            # Hashing waits for the write in the background too: the training thread goes on.
            self._pending = (self._executor.submit(_finish_async_write, fut, tmp), tmp, final, step)
            return final
        try:
            dcp.save(state, checkpoint_id=tmp, no_dist=not _dist())
            checksums.write_part(tmp, _rank(), COMMIT_MARKER)
        except (Exception, CheckpointException) as e:  # DCP raises a BaseException
            error = e
        self._agree_or_fail(error, tmp, step)
        self._commit(tmp, final, step)
        return final

    def _prepare(self, tmp: Path, step: int, needed: int) -> None:
        """Rank 0 checks free space and makes the temp folder; every rank learns the outcome."""
        error: Exception | None = None
        if _rank() == 0:
            try:
                check_free_space(
                    self.root,
                    needed,
                    f"checkpoint-{step}",
                    "Free some space, lower training.save_total_limit or move training.output_dir, then resume "
                    "(the previous checkpoints are intact)",
                )
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                error = e
        if _any_rank(error is not None):
            if isinstance(error, ExplainedOSError):
                raise error
            raise self._save_error(error, step, None)

    def _write_rank0_files(
        self,
        tmp: Path,
        step: int,
        trainer_state: Mapping[str, Any],
        config: BaseModel | None,
        model_config: ModelConfig | None,
        extra: Mapping[str, Any],
    ) -> None:
        _torch_save_synced(dict(trainer_state), tmp / "trainer_state.pt")
        if config is not None:
            save_config(config, tmp / "config.yaml")
            fsync_path(tmp / "config.yaml")
        meta: dict[str, Any] = {"step": step, "world_size": _world(), "time": time.time(), **extra}
        if model_config is not None:
            meta["model_config"] = config_to_dict(model_config)
        write_text_synced(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")

    def _agree_or_fail(self, error: Exception | None, tmp: Path, step: int) -> None:
        """If any rank failed: free the partial folder and raise one clear error on every rank."""
        if not _any_rank(error is not None):
            return
        free = None
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(self.root).free  # before the cleanup gives the space back
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise self._save_error(error, step, free)

    def _save_error(self, error: Exception | None, step: int, free: int | None) -> Exception:
        where = f"saving checkpoint-{step} in {self.root} failed (the previous checkpoints are intact)"
        if error is None:
            return RuntimeError(f"{where}: it failed on another rank (see that rank's log)")
        os_error = find_os_error(error)
        # torch.save reports a short write (a full disk) as "unexpected pos ..." without an errno.
        short_write = any("unexpected pos" in str(e) for e in iter_causes(error))
        if os_error is None and (short_write or (free is not None and free < _FULL_BYTES)):
            os_error = OSError(errno.ENOSPC, "No space left on device")
        if os_error is not None:
            return ExplainedOSError(os_error.errno or 0, explain_os_error(os_error, where))
        return RuntimeError(f"{where}: {type(error).__name__}: {error}")

    def wait(self) -> None:
        """Finish a background save and commit it (no-op when none is pending)."""
        if self._pending is None:
            return
        fut, tmp, final, step = self._pending
        self._pending = None
        error: Exception | None = None
        try:
            fut.result()
        except (Exception, CheckpointException) as e:  # DCP raises a BaseException
            error = e
        self._agree_or_fail(error, tmp, step)
        self._commit(tmp, final, step)

    def _commit(self, tmp: Path, final: Path, step: int) -> None:
        _barrier()  # every rank's shards and checksums are on disk (DCP fsyncs its files)
        error: Exception | None = None
        if _rank() == 0:
            try:
                checksums.merge_parts(tmp, _world())
                write_text_synced(tmp / COMMIT_MARKER, f"{step}\n")
                fsync_path(tmp)
                if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
                    old = self.root / f"{OLD_PREFIX}{final.name}"
                    shutil.rmtree(old, ignore_errors=True)
                    final.rename(old)  # a crash from here on: the next start puts `old` back
                    tmp.rename(final)
                    fsync_path(self.root)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    tmp.rename(final)
                fsync_path(self.root)
            except OSError as e:
                error = e
                old = self.root / f"{OLD_PREFIX}{final.name}"
                if not final.exists() and old.is_dir():  # the swap failed halfway: keep the previous one
                    with contextlib.suppress(OSError):
                        old.rename(final)
        self._agree_or_fail(error, tmp, step)
        if _rank() == 0:
            self._prune()
            # Its size on disk says what a checkpoint costs (a LoRA run's holds only the adapters).
            size = sum(p.stat().st_size for p in final.iterdir() if p.is_file())
            log.info("checkpoint committed: %s (%s)", final, human_bytes(size))
        _barrier()

    def _prune(self) -> None:
        """Drop all but the newest ``keep_last``: rename each away first, so a half-deleted one is never valid."""
        for _, path in list_checkpoints(self.root)[: -self.keep_last]:
            try:
                discard_checkpoint(path)
            except OSError as e:  # the new checkpoint is committed; an old one lingering is harmless
                log.warning("could not remove old checkpoint %s: %s", path, explain_os_error(e))

    # ---- loading and closing -----------------------------------------------------------------

    def load(
        self,
        path: str | os.PathLike[str],
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        save_frozen_params: bool = True,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restore model (+ optimizer) in place; return (trainer state, this rank's state or None)."""
        return load_checkpoint(
            path, model=model, optimizer=optimizer, verify=self.verify_checksums, frozen_params=save_frozen_params
        )

    def close(self) -> None:
        """Commit a pending background save, then give the folder lock back (safe to call twice)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._finalizer is not None:
                self._finalizer()  # releases the lock once, also when close() is never called

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _finish_async_write(fut: Future, tmp: Path) -> None:
    """Background thread: wait for DCP's write, then hash this rank's files."""
    fut.result()
    checksums.write_part(tmp, _rank(), COMMIT_MARKER)


def discard_checkpoint(path: str | os.PathLike[str]) -> None:
    """Delete a checkpoint folder, renaming it away first: a crash midway never leaves a half-deleted
    folder that still looks committed (the ``.pruned-`` remains are cleared at the next start)."""
    path = Path(path)
    if path.is_symlink():  # renamed, the link would become a `.pruned-` leftover that rmtree refuses
        raise ExplainedOSError(
            errno.EPERM,
            f"{path} is a symbolic link to {os.readlink(path)}: only checkpoint folders inside the stage folder are "
            "deleted; remove the link and the folder it points to yourself",
        )
    trash = path.parent / f"{PRUNED_PREFIX}{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    fsync_path(path.parent)
    shutil.rmtree(trash)


def clean_leftovers(root: str | os.PathLike[str]) -> None:
    """What a crash left in ``root``: partial saves and half-pruned folders go, a replaced step comes back.

    ``.old-checkpoint-N`` is a committed checkpoint moved aside while step N was re-saved; if the
    crash came before the new one took its place, it is restored. Call only while holding the lock.
    """
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.is_symlink() and p.name.startswith((TMP_PREFIX, PRUNED_PREFIX)):
            log.info("removing the link %s, left behind by an interrupted cleanup (not what it points to)", p)
            p.unlink()
            continue
        if not p.is_dir():
            continue
        if p.name.startswith(OLD_PREFIX):
            final = root / p.name[len(OLD_PREFIX) :]
            if _STEP_RE.match(final.name) and not final.exists() and is_committed(p):
                log.warning("restoring %s, moved aside by a save that did not finish", final)
                p.rename(final)
                continue
        if p.name.startswith((TMP_PREFIX, PRUNED_PREFIX, OLD_PREFIX)):
            log.info("removing %s, left behind by an interrupted save or cleanup", p)
            shutil.rmtree(p, ignore_errors=True)


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors this rank holds in a (nested) state dict; DTensors count their local shard."""
    if isinstance(obj, torch.Tensor):
        local = getattr(obj, "_local_tensor", obj)
        return local.numel() * local.element_size() + _PER_TENSOR_BYTES
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    """``dcp.load`` with its BaseException-derived failure turned into an ordinary, catchable error."""
    try:
        dcp.load(state, checkpoint_id=path, no_dist=not _dist())
    except CheckpointException as e:
        found = [v[0] if isinstance(v, tuple) else v for v in getattr(e, "failures", {}).values()]
        causes = [f"{type(c).__name__}: {c}" for c in found]
        raise RuntimeError(f"{path}: damaged or incompatible checkpoint ({'; '.join(causes) or e})") from None


_warned_unverified: set[Path] = set()


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Check a checkpoint's files against its ``checksums.sha256`` (collective: ranks share the work).

    Raises :class:`ChecksumMismatch` (a ``RuntimeError``) on every rank when any file is missing or
    differs, so a resume falls back to the previous checkpoint as it does for any damage. A
    checkpoint written before manifests existed is loaded with a warning.
    """
    path = Path(path)
    problems: list[str] = []
    try:
        sums = checksums.read_manifest(path)
    except ChecksumMismatch as e:
        sums, problems = {}, [str(e)]
    if sums is None:
        if path not in _warned_unverified:
            _warned_unverified.add(path)
            log.warning(
                "%s has no %s (saved by an older version): its integrity is not verified", path, checksums.MANIFEST
            )
        sums = {}
    problems += checksums.verify(path, sums, rank=_rank(), world_size=_world())
    if _any_rank(bool(problems)):
        detail = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ChecksumMismatch(
            f"{path}: damaged since it was written ({detail or 'found by another rank'}); an older checkpoint is needed"
        )


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    verify: bool = True,
    frozen_params: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load a committed checkpoint into ``model`` (and ``optimizer``), resharding to this world size.

    ``verify`` checks the checksum manifest first (:func:`verify_checkpoint`; collective). With
    ``frozen_params=False`` only trainable weights are read (the frozen ones stay as the model has
    them). The rank state (loader position, RNG) is returned only when this rank saved one; after a
    world-size change it is ``None`` and the caller decides how to continue.
    """
    path = Path(path)
    if not is_committed(path):
        raise ValueError(f"{path}: not a committed checkpoint (missing {COMMIT_MARKER})")
    if verify:
        verify_checkpoint(path)
    options = StateDictOptions(ignore_frozen_params=not frozen_params, strict=frozen_params)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        _dcp_load(state, path)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
        )
    else:
        state = {"model": get_model_state_dict(model, options=options)}
        _dcp_load(state, path)
        set_model_state_dict(model, state["model"], options=options)
    trainer_state = read_trainer_state(path)
    saved_world = json.loads((path / "meta.json").read_text())["world_size"]
    world = _world()
    rank_file = path / f"rank_{_rank()}.pt"
    rank_state = None
    if saved_world == world and rank_file.is_file():
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
    return trainer_state, rank_state


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded, CPU state dict with clean names (no FSDP/compile/AC wrappers); complete on rank 0."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A committed checkpoint folder, or the newest committed one inside a run's checkpoint folder."""
    p = Path(path)
    if is_committed(p):
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(
            f"{p}: not a committed training checkpoint (no {COMMIT_MARKER}) and holds no checkpoint-<step> folder"
        )
    return latest


def is_training_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a committed checkpoint folder or a folder of them (as opposed to an HF model directory)."""
    p = Path(path)
    return is_committed(p) or (p.is_dir() and not (p / "config.json").is_file() and bool(list_checkpoints(p)))


def load_model_from_checkpoint(path: str | os.PathLike[str], *, device: str = "cpu") -> tuple[nn.Module, Path]:
    """The model weights of a training checkpoint as a plain (unsharded) model, on one process.

    Works for checkpoints saved by any number of ranks (DCP reshards on load). Returns the model and
    the checkpoint folder used. The optimizer state is not read.
    """
    from llm_pipeline.model.llama import build_model

    ckpt = resolve_checkpoint(path)
    try:
        meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{ckpt}: unreadable meta.json ({e}); the checkpoint is damaged") from None
    if "model_config" not in meta:
        raise ConfigError(f"{ckpt}: meta.json records no model_config (saved by an older version)")
    if meta.get("frozen_params_saved") is False:
        raise ConfigError(
            f"{ckpt} holds only the trainable weights (frozen_params_saved: false); the frozen ones are in the "
            "model the run started from (model.init_from in its config.yaml), which this run kind cannot rebuild. "
            "Export the run's <output_dir>_final instead"
        )
    model = build_model(ModelConfig.model_validate(meta["model_config"]), device=device, init=False)
    try:
        load_checkpoint(ckpt, model=model, optimizer=None)
    except (RuntimeError, ValueError, OSError) as e:
        raise ConfigError(f"{ckpt}: could not load the model weights: {e}") from None
    return model, ckpt


def checkpoint_tokenizer_dir(path: str | os.PathLike[str], *, written: Sequence[Path] = ()) -> Path | None:
    """The tokenizer a checkpoint's run trained with, if it still exists: one the stage wrote beside its
    checkpoints (``written``: its kind's ``Stage.written_tokenizer_dirs``), else the run config's
    ``data.tokenizer_dir``, else the starting model's ``model.init_from``."""
    cfg_file = Path(path) / "config.yaml"
    if not cfg_file.is_file():
        return None
    import yaml

    data = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    for tok in (*written, (data.get("data") or {}).get("tokenizer_dir"), (data.get("model") or {}).get("init_from")):
        if tok and (Path(tok) / "tokenizer.json").is_file():
            return Path(tok)
    return None
