"""The loop's checkpoints: where a run starts (fresh, resumed or refused), when it saves, what it saves.

The files, their checksums and their atomic commit belong to
:class:`~llm_pipeline.checkpoint.dcp.CheckpointManager`; the loop's state to the trainer, which
hands it over as two dicts (``trainer_state``: rank 0's counters and schedule; ``rank_state``: each
rank's data position, RNG, objective and callback states) and takes a loaded checkpoint back through
a ``restore`` function. What stays here is the policy: refuse to start over a folder of another run,
fall back past a damaged newest checkpoint (``auto`` only), save every ``save_steps`` and at the end.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from llm_pipeline.checkpoint.dcp import CheckpointManager, checkpoint_path, list_checkpoints, resolve_resume
from llm_pipeline.train.config import TrainingConfig
from llm_pipeline.train.errors import TrainingError
from llm_pipeline.train.parallel import any_rank
from llm_pipeline.train.resume import check_resume_config

log = logging.getLogger(__name__)

# restore(path, trainer_state, rank_state or None when saved on another world size)
Restore = Callable[[Path, dict[str, Any], dict[str, Any] | None], None]


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (checkpoints load with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """One run's checkpoint policy over ``cfg.output_dir`` (collective: every rank calls every method)."""

    def __init__(
        self,
        cfg: TrainingConfig,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        run_config: BaseModel | None,
        model_config: Any,
        save_frozen_params: bool,
        lock: bool,
    ) -> None:
        self.cfg = cfg
        self.model, self.optimizer, self.device = model, optimizer, device
        self.run_config, self.model_config = run_config, model_config
        self.save_frozen_params = save_frozen_params
        self.lock = lock  # False when the caller (the stage runner) holds the folder's lock
        self.last_saved: int | None = None  # the step of the newest checkpoint of this run (resumed or saved)
        self._manager: CheckpointManager | None = None

    @contextlib.contextmanager
    def opened(self) -> Iterator[Checkpointer]:
        """Hold the folder for one run: on leaving, a pending async save is committed and the lock released."""
        cfg = self.cfg
        self.last_saved = None
        with CheckpointManager(
            cfg.output_dir,
            keep_last=cfg.save_total_limit,
            async_save=cfg.async_save,
            verify_checksums=cfg.verify_checksums,
            lock=self.lock,
            final_dir=cfg.resolved_final_dir,
        ) as manager:
            self._manager = manager
            try:
                yield self
            finally:
                self._manager = None

    def starting_point(self) -> Path | None:
        """The checkpoint this run resumes from, or None for a fresh start."""
        cfg = self.cfg
        resume = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
        earlier = list_checkpoints(cfg.output_dir)
        if resume is None and earlier:
            # Starting over would overwrite and prune that run's checkpoints: never without being asked.
            raise TrainingError(
                f"{cfg.output_dir} holds checkpoints of an earlier run (newest: {earlier[-1][1].name}): resume it "
                "with --resume_from_checkpoint auto, or choose another --output_dir"
            )
        return resume

    def resume(self, path: Path, restore: Restore) -> Path:
        """Load ``path`` and ``restore`` it; with ``resume_from_checkpoint: auto``, a damaged newest
        checkpoint falls back to older ones. Returns the checkpoint actually resumed from.

        A committed checkpoint can still be damaged afterwards (a truncated shard, a disk error). All
        ranks agree on each attempt's outcome, so no rank trains from a different step. A config that
        cannot be resumed (a changed model or data) is not damage: it stops the run at once.
        """
        auto = self.cfg.resume_from_checkpoint == "auto"
        candidates = [path]
        if auto:
            candidates += [p for _, p in reversed(list_checkpoints(self.cfg.output_dir)) if p != path]
        errors: list[str] = []
        for candidate in candidates:
            reason = f"{candidate}: failed on another rank"
            try:
                step = self._load(candidate, restore)
                failed = False
            except TrainingError:
                raise
            except (RuntimeError, ValueError, OSError, KeyError, EOFError) as e:  # what a damaged file raises
                failed, reason = True, f"{candidate}: {type(e).__name__}: {e}"
            if not any_rank(failed, self.device):
                if errors:
                    log.warning("resumed from an older checkpoint; skipped damaged ones:\n  %s", "\n  ".join(errors))
                self.last_saved = step
                return candidate
            errors.append(reason)
            if not auto:
                break
            log.warning("checkpoint %s could not be loaded; trying the previous one", candidate)
        raise RuntimeError("no loadable checkpoint to resume from:\n  " + "\n  ".join(errors))

    def _load(self, path: Path, restore: Restore) -> int:
        assert self._manager is not None
        changes = check_resume_config(path, self.run_config)
        state, rank_state = self._manager.load(
            path, model=self.model, optimizer=self.optimizer, save_frozen_params=self.save_frozen_params
        )
        restore(path, state, rank_state)
        for line in changes:
            log.info("resume: %s (applied from step %d)", line, state["step"])
        log.info("resumed from %s at step %d", path, state["step"])
        return state["step"]

    def due(self, step: int) -> bool:
        """Whether the cadence (``save_steps``) asks for a checkpoint after ``step``."""
        return bool(self.cfg.save_steps) and step % self.cfg.save_steps == 0

    def save(self, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        assert self._manager is not None
        path = self._manager.save(
            step,
            model=self.model,
            optimizer=self.optimizer,
            trainer_state=trainer_state,
            rank_state=rank_state,
            config=self.run_config,
            model_config=self.model_config,
            save_frozen_params=self.save_frozen_params,
        )
        self.last_saved = step
        return path

    def wait(self) -> None:
        """Commit a pending async save (the run ends or an error is on its way out)."""
        if self._manager is not None:
            self._manager.wait()

    def latest(self) -> Path | None:
        """The folder of this run's newest checkpoint (None when it neither resumed nor saved)."""
        return checkpoint_path(self.cfg.output_dir, self.last_saved) if self.last_saved is not None else None
