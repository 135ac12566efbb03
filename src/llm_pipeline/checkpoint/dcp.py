"""Training checkpoints: sharded DCP folders committed atomically, kept N deep, resumed exactly.

One folder per step, ``<output_dir>/checkpoint-<step>/``:

- DCP files (``.metadata``, ``__<rank>_0.distcp``): model and optimizer, sharded as trained
  (FSDP2 DTensors or plain tensors; a checkpoint loads on another world size);
- ``trainer_state.pt``: step, scheduler, curriculum, counters (rank 0);
- ``rank_<r>.pt``: that rank's data-loader position and RNG states;
- ``config.yaml`` (the resolved run config) and ``meta.json``;
- ``COMMITTED``: written last. A folder without it is not a checkpoint.

Everything is written into ``.tmp-checkpoint-<step>``, fsynced, then renamed into place, so a
crash at any moment leaves either the previous checkpoints or a complete new one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
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

from llm_pipeline.checkpoint.fsio import fsync_path, write_text_synced
from llm_pipeline.config import ConfigError, ModelConfig, config_to_dict, save_config

log = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-" + PREFIX
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


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
    """Saves and loads training state for every rank; all methods are collective."""

    def __init__(self, root: str | os.PathLike[str], *, keep_last: int = 3, async_save: bool = False) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: tuple[Future, Path, Path, int] | None = None
        self._async_group = None
        if async_save and _dist():
            # Background writes must not share a communicator with the training collectives.
            self._async_group = dist.new_group(backend="gloo")
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(TMP_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

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
        """
        self.wait()
        tmp = self.root / f"{TMP_PREFIX}{step}"
        final = checkpoint_path(self.root, step)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        options = StateDictOptions(ignore_frozen_params=not save_frozen_params)
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
            state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        else:
            state = {"model": get_model_state_dict(model, options=options)}
        _torch_save_synced(dict(rank_state), tmp / f"rank_{_rank()}.pt")
        if _rank() == 0:
            _torch_save_synced(dict(trainer_state), tmp / "trainer_state.pt")
            if config is not None:
                save_config(config, tmp / "config.yaml")
                fsync_path(tmp / "config.yaml")
            meta: dict[str, Any] = {
                "step": step,
                "world_size": dist.get_world_size() if _dist() else 1,
                "time": time.time(),
                "frozen_params_saved": save_frozen_params,
            }
            if model_config is not None:
                meta["model_config"] = config_to_dict(model_config)
            write_text_synced(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        if self.async_save:
            fut = dcp.async_save(state, checkpoint_id=tmp, process_group=self._async_group)
            self._pending = (fut, tmp, final, step)
        else:
            dcp.save(state, checkpoint_id=tmp, no_dist=not _dist())
            self._commit(tmp, final, step)
        return final

    def wait(self) -> None:
        """Finish a background save and commit it (no-op when none is pending)."""
        if self._pending is None:
            return
        fut, tmp, final, step = self._pending
        self._pending = None
        fut.result()
        self._commit(tmp, final, step)

    def _commit(self, tmp: Path, final: Path, step: int) -> None:
        _barrier()  # every rank's shards are on disk (DCP fsyncs its files)
        if _rank() == 0:
            write_text_synced(tmp / COMMIT_MARKER, f"{step}\n")
            fsync_path(tmp)
            if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
                old = self.root / f".old-{final.name}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
            fsync_path(self.root)
            self._prune()
            log.info("checkpoint committed: %s", final)
        _barrier()

    def _prune(self) -> None:
        for _, path in list_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def load(
        self,
        path: str | os.PathLike[str],
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        save_frozen_params: bool = True,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restore model (+ optimizer) in place; return (trainer state, this rank's state or None)."""
        return load_checkpoint(path, model=model, optimizer=optimizer, frozen_params=save_frozen_params)

    def close(self) -> None:
        """Finish any background save; the run is over."""
        self.wait()


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    """``dcp.load`` with its BaseException-derived failure turned into an ordinary, catchable error."""
    try:
        dcp.load(state, checkpoint_id=path, no_dist=not _dist())
    except CheckpointException as e:
        causes = [f"{type(c).__name__}: {c}" for c in getattr(e, "failures", {}).values()]
        raise RuntimeError(f"{path}: damaged or incompatible checkpoint ({'; '.join(causes) or e})") from None


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    frozen_params: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load a committed checkpoint into ``model`` (and ``optimizer``), resharding to this world size.

    With ``frozen_params=False`` only trainable weights are read (the frozen ones stay as the model
    has them). The rank state (loader position, RNG) is returned only when this rank saved one;
    after a world-size change it is ``None`` and the caller decides how to continue.
    """
    path = Path(path)
    if not is_committed(path):
        raise ValueError(f"{path}: not a committed checkpoint (missing {COMMIT_MARKER})")
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
    world = dist.get_world_size() if _dist() else 1
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
    model = build_model(ModelConfig.model_validate(meta["model_config"]), device=device, init=False)
    try:
        load_checkpoint(ckpt, model=model, optimizer=None)
    except (RuntimeError, ValueError, OSError) as e:
        raise ConfigError(f"{ckpt}: could not load the model weights: {e}") from None
    return model, ckpt


def checkpoint_tokenizer_dir(path: str | os.PathLike[str]) -> Path | None:
    """The tokenizer folder recorded in a checkpoint's run config (``data.tokenizer_dir``), if it still exists."""
    cfg_file = Path(path) / "config.yaml"
    if not cfg_file.is_file():
        return None
    import yaml

    data = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    tok = (data.get("data") or {}).get("tokenizer_dir")
    return Path(tok) if tok and (Path(tok) / "tokenizer.json").is_file() else None
