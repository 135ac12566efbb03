"""The one training loop, shared by every stage (pretraining, SFT, DPO, LoRA).

The loop owns what every stage needs: gradient accumulation to a global batch counted in loss
units, AdamW with decay groups, clipping, the schedule, mixed precision, evaluation, atomic
checkpoints with exact resume, the batch plan (token curriculum or whole-example rows), OOM
recovery, skipping of non-finite steps and of batches with nothing to train on, signal handling
and metrics. What differs between stages is the :class:`~llm_pipeline.train.objectives.Objective`
(loss, batch format, cost) and the batch source; :mod:`llm_pipeline.train.stage` assembles them.
Small :class:`Callback` hooks let callers observe or steer a run without touching the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from llm_pipeline.checkpoint.dcp import CheckpointManager, checkpoint_path, list_checkpoints, resolve_resume
from llm_pipeline.model.flops import FlopModel
from llm_pipeline.train import oom as oom_lib
from llm_pipeline.train.batching import Batch, Batching, BatchSource, StepPlan, TokenBatching, split_batch
from llm_pipeline.train.config import CurriculumStage, TrainingConfig
from llm_pipeline.train.metrics import MetricsWriter, peak_flops, peak_memory_gib
from llm_pipeline.train.objectives import BatchCost, Objective
from llm_pipeline.train.parallel import DistInfo, all_reduce_sum, any_rank, uses_fsdp
from llm_pipeline.train.resume import apply_optimizer_settings, check_resume_config

log = logging.getLogger(__name__)

Status = Literal["completed", "preempted", "diverged"]


class TrainingError(RuntimeError):
    """The run cannot go on for a reason the user can act on (the message says which)."""


class Callback:
    """Hooks around the loop; override what you need. ``step`` counts completed optimizer steps.

    ``state_dict``/``load_state_dict`` are saved per rank with every checkpoint.
    """

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_start(self, trainer: Trainer, step: int) -> None: ...

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    status: Status
    step: int
    checkpoint: Path | None = None
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss of that step
    val_loss: float | None = None  # the last validation loss
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss (0 = before training)
    eval_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> every validation metric
    skipped_steps: int = 0
    empty_batches: int = 0
    oom_events: int = 0
    tokens_seen: int = 0
    final_dir: Path | None = None
    exports: dict[str, Path] = field(default_factory=dict)  # exporter name -> folder (the stage runner fills it)
    stats: dict[str, float] = field(default_factory=dict)  # what a stage's callbacks report (e.g. LoRA's data mix)


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over trainable params: weight decay on matrices only (not norms, biases or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise TrainingError("the model has no trainable parameters (every weight is frozen)")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "decay": True},
        {"params": no_decay, "weight_decay": 0.0, "decay": False},
    ]
    params = decay + no_decay
    # The fused kernel exists for CUDA and CPU float tensors (DTensors included).
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=fused,
    )


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """Multiplier of the peak LR at ``step``: linear warmup, then cosine / linear / WSD / constant."""
    warmup = cfg.resolved_warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.lr_schedule == "constant":
        return 1.0
    total = max(cfg.max_steps - warmup, 1)
    if cfg.lr_schedule in ("cosine", "linear"):
        progress = min((step - warmup) / total, 1.0)
        if cfg.lr_schedule == "linear":  # HF's get_linear_schedule_with_warmup when the floor is 0
            return 1.0 - (1.0 - floor) * progress
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # WSD: stable at the peak, then a linear decay to the floor over the last fraction of the run.
    decay_steps = max(round(cfg.max_steps * cfg.wsd_decay_fraction), 1)
    decay_start = cfg.max_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return 1.0 - (1.0 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # The lambda reads the trainer's config object, so a resume with a changed schedule recomputes it.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


def _rng_state() -> dict[str, Any]:
    # Only tensors and plain Python values, so checkpoints load with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_autocast(model: nn.Module, precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The precision context of the loop's forwards, for work outside it on the same model (a reference pass).

    FSDP casts params itself (MixedPrecisionPolicy); a single process uses bf16 autocast.
    """
    if precision == "bf16" and not uses_fsdp(model):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class Trainer:
    """Runs ``objective`` on ``model`` over ``train_source`` for ``cfg.max_steps`` optimizer steps.

    ``batching`` cuts each step (a token curriculum or whole-example rows); passing ``curriculum``
    instead is shorthand for token batching with ``cfg.global_batch_tokens``. With
    ``save_frozen_params=False`` checkpoints hold only trainable weights (and their optimizer state):
    the frozen ones must come from the starting model again on resume (LoRA's base). Each of
    ``extra_val_sources`` is evaluated with ``val_source`` and logged as ``<name>_loss``/``<name>_ppl``
    (e.g. a fine-tuning stage's general data, to watch forgetting as it happens).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        objective: Objective,
        train_source: BatchSource,
        cfg: TrainingConfig,
        info: DistInfo | None = None,
        batching: Batching | None = None,
        curriculum: Sequence[CurriculumStage] | None = None,
        val_source: BatchSource | None = None,
        model_config: Any = None,
        run_config: BaseModel | None = None,
        callbacks: Sequence[Callback] = (),
        fp8: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        save_frozen_params: bool = True,
        lock_output_dir: bool = True,
        extra_val_sources: Mapping[str, BatchSource] | None = None,
    ) -> None:
        if batching is None:
            if curriculum is None:
                raise ValueError("pass batching= (or curriculum= for a token stream)")
            batching = TokenBatching(cfg.global_batch_tokens, cfg.micro_batch_size, curriculum)
        self.model = model
        self.objective = objective
        self.train_source = train_source
        self.val_source = val_source
        self.cfg = cfg
        self.info = info or DistInfo()
        self.batching = batching
        self.model_config = model_config
        self.run_config = run_config
        self.callbacks = list(callbacks)
        self.fp8 = fp8
        self.save_frozen_params = save_frozen_params
        self.lock_output_dir = lock_output_dir  # False when the caller (the stage runner) holds the lock
        self.optimizer = optimizer or build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.fsdp = uses_fsdp(model)
        self.device = self.info.device
        # Without an architecture FLOPs are unknown (MFU is not logged) but tokens are still counted.
        self.flop_model = (
            FlopModel.from_model(model, model_config) if model_config is not None else FlopModel(0, 0, 0, False, 0)
        )
        # Resumable counters.
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.empty_batches = 0
        self.oom_events = 0
        self.micro_cap: int | None = None  # lowered by OOM recovery (the batching's unit), kept across resume
        self.plan: StepPlan | None = None
        self._stop_signal: int | None = None
        self._val_start = val_source.state_dict() if val_source is not None else None
        self._extra_val = {name: (src, src.state_dict()) for name, src in (extra_val_sources or {}).items()}
        self._ckpt: CheckpointManager | None = None

    # ---- helpers -------------------------------------------------------------------------

    def prepare(self) -> StepPlan:
        """Cut the coming step (curriculum length, micro-batch, accumulation) and tell the source."""
        self._apply_plan(self.batching.plan(self.step, self.info.world_size, self.micro_cap))
        assert self.plan is not None
        return self.plan

    def _apply_plan(self, plan: StepPlan) -> None:
        if plan != self.plan:
            self.batching.apply(self.train_source, plan)
            if self.plan is not None:
                log.info("step %d: %s", self.step, _describe(plan))
            self.plan = plan

    def _autocast(self) -> contextlib.AbstractContextManager:
        return training_autocast(self.model, self.cfg.precision, self.device)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "empty_batches": self.empty_batches,
            "oom_events": self.oom_events,
            "micro_cap": self.micro_cap,
            "seq_len": self.plan.seq_len if self.plan else None,
            "scheduler": self.scheduler.state_dict(),
        }

    def _rank_state(self) -> dict[str, Any]:
        return {
            "loader": self.train_source.state_dict(),
            "rng": _rng_state(),
            "objective": self.objective.state_dict(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
        }

    def save_checkpoint(self) -> Path:
        assert self._ckpt is not None
        return self._ckpt.save(
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            trainer_state=self.trainer_state(),
            rank_state=self._rank_state(),
            config=self.run_config,
            model_config=self.model_config,
            save_frozen_params=self.save_frozen_params,
        )

    def _resume(self, path: Path) -> None:
        assert self._ckpt is not None
        changes = check_resume_config(path, self.run_config)
        state, rank_state = self._ckpt.load(
            path, model=self.model, optimizer=self.optimizer, save_frozen_params=self.save_frozen_params
        )
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_skips = state["consecutive_skips"]
        self.empty_batches = state.get("empty_batches", 0)
        self.oom_events = state["oom_events"]
        self.micro_cap = state.get("micro_cap", state.get("micro_tokens_cap"))
        self.scheduler.load_state_dict(state["scheduler"])
        # The checkpoint restored the old hyper-parameters; the ones in force are this run's config.
        apply_optimizer_settings(self.optimizer, self.scheduler, self.cfg, self.step)
        for line in changes:
            log.info("resume: %s (applied from step %d)", line, self.step)
        if rank_state is None:
            log.warning("%s was saved with another world size: the data stream restarts on each rank", path)
        else:
            self.train_source.load_state_dict(rank_state["loader"])
            _set_rng_state(rank_state["rng"])
            self.objective.load_state_dict(rank_state.get("objective", {}))
            for cb, cb_state in zip(self.callbacks, rank_state.get("callbacks", []), strict=False):
                cb.load_state_dict(cb_state)
        # The loader state carries the shape it was saved with; a checkpoint taken on a curriculum
        # boundary (or a changed micro-batch) must switch it to the plan for the coming step.
        self.plan = None
        self.prepare()
        log.info("resumed from %s at step %d", path, self.step)

    def _resume_with_fallback(self, path: Path, *, auto: bool) -> Path:
        """Resume from ``path``; with ``auto``, a damaged newest checkpoint falls back to older ones.

        A committed checkpoint can still be damaged afterwards (a truncated shard, a disk error). All
        ranks agree on each attempt's outcome, so no rank trains from a different step. A config that
        cannot be resumed (a changed model or data) is not damage: it stops the run at once.
        """
        candidates = [path]
        if auto:
            candidates += [p for _, p in reversed(list_checkpoints(self.cfg.output_dir)) if p != path]
        errors: list[str] = []
        for candidate in candidates:
            reason = f"{candidate}: failed on another rank"
            try:
                self._resume(candidate)
                failed = False
            except TrainingError:
                raise
            except (RuntimeError, ValueError, OSError, KeyError, EOFError) as e:  # what a damaged file raises
                failed, reason = True, f"{candidate}: {type(e).__name__}: {e}"
            if not any_rank(failed, self.device):
                if errors:
                    log.warning("resumed from an older checkpoint; skipped damaged ones:\n  %s", "\n  ".join(errors))
                return candidate
            errors.append(reason)
            if not auto:
                break
            log.warning("checkpoint %s could not be loaded; trying the previous one", candidate)
        raise RuntimeError("no loadable checkpoint to resume from:\n  " + "\n  ".join(errors))

    # ---- signals ---------------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        """SIGTERM/SIGUSR1 (schedulers) and a first Ctrl-C: save at the step boundary and stop.

        A second Ctrl-C exits at once (the last committed checkpoint is intact: saves are atomic).
        """
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self._stop_signal is not None:
                os.write(2, b"\nsecond Ctrl-C: exiting now without saving (the last checkpoint is intact)\n")
                os._exit(130)
            if signum == signal.SIGINT:
                os.write(2, b"\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: exit now)\n")
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        return previous

    # ---- one step --------------------------------------------------------------------------

    def _forward_backward(self, batches: list[Batch], units: float) -> tuple[float, dict[str, float]]:
        scale = self.info.world_size / units  # FSDP averages gradients over ranks
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            with self._autocast():
                out = self.objective(self.model, batch)
            (out.loss_sum * scale).backward()
            loss_sum += out.loss_sum.detach().float()
            for k, v in out.metric_sums.items():
                metric_sums[k] = metric_sums.get(k, 0) + v.float()
        packed = torch.stack([loss_sum, *metric_sums.values()])
        packed = all_reduce_sum(packed) / units
        values = packed.tolist()
        return values[0], dict(zip(metric_sums, values[1:], strict=True))

    def _grad_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP: the partial norms are summed here
            norm = norm.full_tensor()
        if self.cfg.max_grad_norm > 0 and torch.isfinite(norm):
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.max_grad_norm, norm, foreach=True)
        return float(norm)

    def _fetch_step(self) -> tuple[list[Batch], float, BatchCost, float]:
        """The next global batch that has something to train on: (device batches, units, cost, fetch seconds).

        A global batch with no loss units (e.g. every label masked) is skipped and counted; too many in
        a row stop the run, since the data (or its masks) are broken.
        """
        assert self.plan is not None
        empty_in_a_row = 0
        while True:
            t0 = time.perf_counter()
            cpu = [self.train_source.next_batch() for _ in range(self.plan.accum)]
            cost = BatchCost(0, 0.0)
            for b in cpu:
                cost = cost + self.objective.cost(b, self.flop_model)
            local = [float(sum(self.objective.count(b) for b in cpu)), float(cost.tokens), cost.flops]
            totals = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=self.device)).tolist()
            batches = [self._to_device(b) for b in cpu]
            elapsed = time.perf_counter() - t0
            if totals[0] > 0:
                return batches, totals[0], BatchCost(int(totals[1]), totals[2]), elapsed
            self.empty_batches += 1
            empty_in_a_row += 1
            log.warning("step %d: the global batch has nothing to train on (all labels masked); skipped", self.step + 1)
            if empty_in_a_row >= self.cfg.max_empty_batches:
                raise TrainingError(
                    f"{empty_in_a_row} global batches in a row had no trained token (every label is -100): the "
                    "data's loss masks are empty. Check the data (e.g. examples whose responses were truncated "
                    "away, a chat template without assistant turns) or raise training.max_empty_batches"
                )

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the global batch; returns that step's metrics."""
        assert self.plan is not None
        t0 = time.perf_counter()
        batches, units, cost, data_time = self._fetch_step()
        while True:
            failed = False
            try:
                loss, metric = self._forward_backward(batches, units)
            except Exception as e:
                if not (self.cfg.enable_oom_recovery and oom_lib.is_oom(e)):
                    raise
                failed = True
            if not (self.cfg.enable_oom_recovery and any_rank(failed, self.device)):
                break
            # Every rank agreed: give memory back, split the micro-batches, replay the same rows.
            oom_lib.free_memory(self.model, self.optimizer)
            old = self.plan
            micro = oom_lib.halve_micro_batch(old.micro)
            self.micro_cap = self.batching.cap_after_split(old, micro)
            batches = [part for b in batches for part in split_batch(b, old.micro // micro)]
            self._apply_plan(StepPlan(seq_len=old.seq_len, micro=micro, accum=old.rows // micro))
            self.oom_events += 1
            log.warning(
                "OOM at step %d: micro-batch %d -> %d rows, accumulation %d -> %d (global batch unchanged)",
                self.step + 1, old.micro, micro, old.accum, self.plan.accum,
            )  # fmt: skip
        grad_norm = self._grad_norm()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            if self.fp8 and self.fsdp:
                from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

                precompute_float8_dynamic_scale_for_fsdp(self.model)
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            log.warning("step %d: non-finite loss %s / grad norm %s, update skipped", self.step + 1, loss, grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += cost.tokens
        return {
            "loss": loss,
            **metric,
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped": not finite,
            "tokens": cost.tokens,
            "flops": cost.flops,
            "units": units,
            "seq_len": self.plan.seq_len,
            "micro_batch_size": self.plan.micro,
            "accum_steps": self.plan.accum,
            "step_time_s": time.perf_counter() - t0,
            "data_time_s": data_time,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss (and metrics) over the same validation batches every time.

        At most ``eval_batches`` micro-batches; a finite source (one pass over held-out examples) may
        end sooner by raising ``StopIteration`` on every rank after the same number of batches.
        """
        assert self.val_source is not None and self._val_start is not None
        result = self._evaluate_source(self.val_source, self._val_start)
        for name, (source, start) in self._extra_val.items():
            result.update({f"{name}_{k}": v for k, v in self._evaluate_source(source, start).items()})
        return result

    def _evaluate_source(self, source: BatchSource, start: dict[str, Any]) -> dict[str, float]:
        assert self.plan is not None
        source.load_state_dict(start)
        self.batching.apply(source, self.plan)
        self.model.eval()
        sums = torch.zeros(2, device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        try:
            for _ in range(self.cfg.eval_batches):
                try:
                    cpu = source.next_batch()
                    ended = False
                except StopIteration:
                    ended = True
                if any_rank(ended, self.device):
                    break
                batch = self._to_device(cpu)
                with self._autocast():
                    out = self.objective(self.model, batch)
                sums[0] += out.loss_sum.float()
                sums[1] += self.objective.count(batch)
                for k, v in out.metric_sums.items():
                    metric_sums[k] = metric_sums.get(k, 0) + v.float()
        finally:
            self.model.train()
        packed = all_reduce_sum(torch.stack([sums[0], sums[1], *metric_sums.values()]))
        units = max(float(packed[1]), 1.0)
        result = {"loss": float(packed[0]) / units}
        result.update({k: float(v) / units for k, v in zip(metric_sums, packed[2:], strict=True)})
        key = self.objective.perplexity_of
        if key is not None and key in result:
            result["loss"] = result[key]
            result["ppl"] = math.exp(min(result[key], 50.0))
        return result

    # ---- the run ---------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to ``max_steps`` (or a stop signal / divergence); always leaves a checkpoint behind."""
        cfg = self.cfg
        self._ckpt = CheckpointManager(
            cfg.output_dir,
            keep_last=cfg.save_total_limit,
            async_save=cfg.async_save,
            verify_checksums=cfg.verify_checksums,
            lock=self.lock_output_dir,
            final_dir=cfg.resolved_final_dir,
        )
        try:
            return self._fit()
        finally:
            self._ckpt.close()  # commits a pending async save, releases the folder lock

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        resume = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
        earlier = list_checkpoints(cfg.output_dir)
        if resume is None and earlier:
            # Starting over would overwrite and prune that run's checkpoints: never without being asked.
            raise TrainingError(
                f"{cfg.output_dir} holds checkpoints of an earlier run (newest: {earlier[-1][1].name}): resume it "
                "with --resume_from_checkpoint auto, or choose another --output_dir"
            )
        self.prepare()
        if resume is not None:
            resume = self._resume_with_fallback(resume, auto=cfg.resume_from_checkpoint == "auto")
        self.model.train()
        writer = MetricsWriter(
            cfg.resolved_logging_dir,
            enabled=self.info.is_main,
            max_steps=cfg.max_steps,
            start_step=self.step,
            console_metrics=self.objective.console_metrics,
        )
        peak, peak_src = peak_flops(self.device, precision=cfg.precision, fp8=self.fp8)
        writer.message(f"MFU peak: {peak / 1e12:.2f} TFLOP/s per device ({peak_src}) x {self.info.world_size}")
        if self.step >= cfg.max_steps:
            writer.message(f"checkpoint {resume} is at step {self.step} >= max_steps {cfg.max_steps}: nothing to train")
        previous = self._install_signals()
        result = TrainResult(status="completed", step=self.step)
        last_saved: int | None = self.step if resume is not None else None
        window: list[dict[str, Any]] = []
        for cb in self.callbacks:
            cb.on_train_start(self)
        try:
            if self.step == 0 and self.val_source is not None and cfg.eval_steps:
                self._eval_and_log(writer, result)  # the baseline the curve starts from
            while self.step < cfg.max_steps:
                self.prepare()
                for cb in self.callbacks:
                    cb.on_step_start(self, self.step)
                m = self.train_step()
                result.losses[self.step] = m["loss"]
                window.append(m)
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step, m)
                writer.advance(self.step)
                if self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                    writer.log(self.step, self._summarise(window, peak))
                    window = []
                if self.val_source is not None and cfg.eval_steps and self.step % cfg.eval_steps == 0:
                    self._eval_and_log(writer, result)
                diverged = self.consecutive_skips >= cfg.max_consecutive_skips
                stop = any_rank(self._stop_signal is not None, self.device)
                if diverged or stop or (cfg.save_steps and self.step % cfg.save_steps == 0):
                    result.checkpoint = self.save_checkpoint()
                    last_saved = self.step
                if diverged:
                    result.status = "diverged"
                    writer.message(
                        f"stopping: {self.consecutive_skips} non-finite steps in a row; state saved to "
                        f"{result.checkpoint}. Lower the learning rate or raise max_grad_norm, then resume."
                    )
                    break
                if stop:
                    result.status = "preempted"
                    name = signal.Signals(self._stop_signal).name if self._stop_signal else "a signal on another rank"
                    writer.message(f"{name}: checkpoint {result.checkpoint} saved at step {self.step}")
                    break
            if self.step == cfg.max_steps and result.status == "completed":
                if self.val_source is not None and cfg.eval_steps and self.step % cfg.eval_steps:
                    self._eval_and_log(writer, result)
                if last_saved != self.step:
                    result.checkpoint = self.save_checkpoint()
        finally:
            if self._ckpt is not None:
                self._ckpt.wait()
            for sig, h in previous.items():
                signal.signal(sig, h)
            writer.close()
        if result.checkpoint is None and last_saved is not None:
            result.checkpoint = checkpoint_path(cfg.output_dir, last_saved)
        result.step = self.step
        result.skipped_steps = self.skipped_steps
        result.empty_batches = self.empty_batches
        result.oom_events = self.oom_events
        result.tokens_seen = self.tokens_seen
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result

    def _eval_and_log(self, writer: MetricsWriter, result: TrainResult) -> None:
        ev = self.evaluate()
        result.val_loss = result.val_losses[self.step] = ev["loss"]
        result.eval_metrics[self.step] = ev
        writer.log(self.step, ev, prefix="eval")

    def _summarise(self, window: list[dict[str, Any]], peak: float) -> dict[str, float | None]:
        """Averages over the steps since the last log line."""
        last = window[-1]
        elapsed = sum(m["step_time_s"] for m in window)
        tokens = sum(m["tokens"] for m in window)
        flops = sum(m["flops"] for m in window)
        losses = [m["loss"] for m in window if math.isfinite(m["loss"])]
        loss = sum(losses) / len(losses) if losses else float("nan")
        # Perplexity of the objective's own metric (cross-entropy without the z-loss term).
        key = self.objective.perplexity_of
        base = [m[key] for m in window if key in m and math.isfinite(m[key])] if key else []
        ppl = math.exp(min(sum(base) / len(base), 50.0)) if base else None
        out: dict[str, float | None] = {
            "loss": loss,
            "ppl": ppl,
            "lr": last["lr"],
            "grad_norm": last["grad_norm"],
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "mfu": flops / elapsed / (peak * self.info.world_size) if elapsed > 0 and flops else None,
            "step_time_s": elapsed / len(window),
            "data_wait_frac": sum(m["data_time_s"] for m in window) / elapsed if elapsed > 0 else 0.0,
            "peak_mem_gib": peak_memory_gib(self.device),
            "skipped_steps": float(self.skipped_steps),
            "empty_batches": float(self.empty_batches),
            "oom_events": float(self.oom_events),
            "tokens_seen": float(self.tokens_seen),
            "units": sum(m["units"] for m in window) / len(window),
            "seq_len": float(last["seq_len"]) if last["seq_len"] is not None else None,
            "micro_batch_size": float(last["micro_batch_size"]),
        }
        for k in self.objective_metric_names(last):  # e.g. ce, z_loss: window means
            out[k] = sum(m[k] for m in window) / len(window)
        return out

    @staticmethod
    def objective_metric_names(step_metrics: dict[str, Any]) -> list[str]:
        own = {"loss", "grad_norm", "lr", "skipped", "tokens", "flops", "units", "seq_len", "micro_batch_size",
               "accum_steps", "step_time_s", "data_time_s"}  # fmt: skip
        return [k for k in step_metrics if k not in own]


def _describe(plan: StepPlan) -> str:
    rows = f"seq_len {plan.seq_len}, " if plan.seq_len is not None else ""
    return f"{rows}micro-batch {plan.micro} x {plan.accum} accumulation"
