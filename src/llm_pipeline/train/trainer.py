"""The one training loop, shared by every stage (pretraining, SFT, DPO, LoRA).

:meth:`Trainer.fit` reads top to bottom: open the checkpoint folder and resume (or start fresh),
open the metrics, install the stop signals, then per step: cut the step (:meth:`Trainer.prepare`),
:meth:`Trainer.train_step`, callbacks, metrics, evaluation when due, a checkpoint when due or when
asked to stop. The step itself owns what every stage needs: gradient accumulation to a global batch
counted in loss units, AdamW with decay groups (:mod:`~llm_pipeline.train.optim`), clipping, the
schedule, mixed precision, OOM recovery, and skipping of non-finite steps and of batches with
nothing to train on. The rest are small collaborators, each in its own module:

- :class:`~llm_pipeline.train.checkpointing.Checkpointer`: resume (with a fallback past damage),
  the save cadence, refusing a folder of another run;
- :class:`~llm_pipeline.train.evaluation.Evaluator`: validation on the same batches every time;
- :class:`~llm_pipeline.train.metrics.StepLogger`: logged lines, MFU, an oversubscribed CPU;
- :class:`~llm_pipeline.train.signals.StopSignals`: SIGTERM/SIGUSR1/Ctrl-C become a save and a stop.

What differs between stages is the :class:`~llm_pipeline.train.objectives.Objective` (loss, batch
format, cost) and the batch source; :mod:`llm_pipeline.train.stage` assembles them. :class:`Callback`
hooks let callers observe or steer a run without touching the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel
from torch import nn

from llm_pipeline.config import config_to_dict
from llm_pipeline.model.flops import FlopModel
from llm_pipeline.train import oom as oom_lib
from llm_pipeline.train.batching import Batch, Batching, BatchSource, StepPlan, TokenBatching, split_batch
from llm_pipeline.train.checkpointing import Checkpointer, rng_state, set_rng_state
from llm_pipeline.train.config import CurriculumStage, TrainingConfig
from llm_pipeline.train.errors import TrainingError
from llm_pipeline.train.evaluation import Evaluator
from llm_pipeline.train.metrics import StepLogger
from llm_pipeline.train.objectives import BatchCost, Objective
from llm_pipeline.train.optim import build_optimizer, build_scheduler
from llm_pipeline.train.parallel import DistInfo, all_reduce_sum, any_rank, uses_fsdp
from llm_pipeline.train.resume import apply_optimizer_settings
from llm_pipeline.train.signals import StopSignals

log = logging.getLogger(__name__)

Status = Literal["completed", "preempted", "diverged"]


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


def training_autocast(model: nn.Module, precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The precision context of the loop's forwards, for work outside it on the same model (a reference pass).

    FSDP casts params itself (MixedPrecisionPolicy); a single process uses bf16 autocast.
    """
    if precision == "bf16" and not uses_fsdp(model):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """Runs ``objective`` on ``model`` over ``train_source`` for ``cfg.max_steps`` optimizer steps.

    ``batching`` cuts each step (a token curriculum or whole-example rows); passing ``curriculum``
    instead is shorthand for token batching with ``cfg.global_batch_tokens``. With
    ``save_frozen_params=False`` checkpoints hold only trainable weights (and their optimizer state):
    the frozen ones must come from the starting model again on resume (LoRA's base). Each of
    ``extra_val_sources`` is evaluated with ``val_source`` and logged as ``<name>_loss``/``<name>_ppl``
    (e.g. a fine-tuning stage's general data, to watch forgetting as it happens). ``stage_name`` is what the
    experiment trackers record as the stage (the stage runner passes the stage kind).
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
        stage_name: str = "train",
    ) -> None:
        if batching is None:
            if curriculum is None:
                raise ValueError("pass batching= (or curriculum= for a token stream)")
            batching = TokenBatching(cfg.global_batch_tokens, cfg.micro_batch_size, curriculum)
        self.model = model
        self.objective = objective
        self.train_source = train_source
        self.cfg = cfg
        self.info = info or DistInfo()
        self.batching = batching
        self.model_config = model_config
        self.run_config = run_config
        self.callbacks = list(callbacks)
        self.fp8 = fp8
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
        # The loop's collaborators.
        self.checkpointer = Checkpointer(
            cfg,
            model=model,
            optimizer=self.optimizer,
            device=self.device,
            run_config=run_config,
            model_config=model_config,
            save_frozen_params=save_frozen_params,
            lock=lock_output_dir,
        )
        self.evaluator = Evaluator(
            model=model,
            objective=objective,
            batching=batching,
            device=self.device,
            autocast=self._autocast,
            val_source=val_source,
            extra_sources=extra_val_sources,
            eval_steps=cfg.eval_steps,
            eval_batches=cfg.eval_batches,
        )
        self.metrics = StepLogger(
            log_dir=cfg.resolved_logging_dir,
            enabled=self.info.is_main,
            max_steps=cfg.max_steps,
            logging_steps=cfg.logging_steps,
            device=self.device,
            world_size=self.info.world_size,
            precision=cfg.precision,
            fp8=fp8,
            perplexity_of=objective.perplexity_of,
            console_metrics=objective.console_metrics,
            trackers=cfg.trackers,
            tracking=cfg.tracking,
            stage=stage_name,
            run_config=config_to_dict(run_config) if run_config is not None else {"training": config_to_dict(cfg)},
        )

    # ---- the run ---------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to ``max_steps`` (or a stop signal / divergence); always leaves a checkpoint behind."""
        with self.checkpointer.opened() as checkpoints:  # the folder's lock; commits a pending async save
            resume = checkpoints.starting_point()  # refuses a folder that holds another run's checkpoints
            self.prepare()
            if resume is not None:
                resume = checkpoints.resume(resume, self._restore)  # falls back past damaged checkpoints
            self.model.train()
            result = TrainResult(status="completed", step=self.step)
            with self.metrics.opened(start_step=self.step) as metrics, StopSignals() as signals:
                if self.step >= (end := self.cfg.max_steps):
                    metrics.message(f"checkpoint {resume} is at step {self.step} >= max_steps {end}: nothing to train")
                try:
                    self._train(result, checkpoints, metrics, signals)
                finally:
                    checkpoints.wait()
                metrics.outcome = result.status  # what the trackers record when they close
            result.checkpoint = result.checkpoint or checkpoints.latest()
            result.step = self.step
            result.skipped_steps = self.skipped_steps
            result.empty_batches = self.empty_batches
            result.oom_events = self.oom_events
            result.tokens_seen = self.tokens_seen
            for cb in self.callbacks:
                cb.on_train_end(self, result)
        return result

    def _train(self, result: TrainResult, checkpoints: Checkpointer, metrics: StepLogger, signals: StopSignals) -> None:
        """The steps: train, report, evaluate and save when due; stop on a signal or divergence."""
        cfg = self.cfg
        for cb in self.callbacks:
            cb.on_train_start(self)
        if self.step == 0 and self.evaluator.enabled:
            self._evaluate(result, metrics)  # the baseline the curve starts from
        while self.step < cfg.max_steps:
            self.prepare()
            for cb in self.callbacks:
                cb.on_step_start(self, self.step)
            m = self.train_step()
            result.losses[self.step] = m["loss"]
            for cb in self.callbacks:
                cb.on_step_end(self, self.step, m)
            metrics.step(self.step, m, self.counters())
            if self.evaluator.due(self.step):
                self._evaluate(result, metrics)
            diverged = self.consecutive_skips >= cfg.max_consecutive_skips
            stop = signals.requested(self.device)
            if diverged or stop or checkpoints.due(self.step):
                result.checkpoint = checkpoints.save(self.step, self.trainer_state(), self.rank_state())
            if diverged:
                result.status = "diverged"
                metrics.message(
                    f"stopping: {self.consecutive_skips} non-finite steps in a row; state saved to "
                    f"{result.checkpoint}. Lower the learning rate or raise max_grad_norm, then resume."
                )
                return
            if stop:
                result.status = "preempted"
                metrics.message(f"{signals.describe()}: checkpoint {result.checkpoint} saved at step {self.step}")
                return
        if self.step == cfg.max_steps:  # the end: a last evaluation and checkpoint unless the cadence just made them
            if self.evaluator.enabled and not self.evaluator.due(self.step):
                self._evaluate(result, metrics)
            if checkpoints.last_saved != self.step:
                result.checkpoint = checkpoints.save(self.step, self.trainer_state(), self.rank_state())

    def _evaluate(self, result: TrainResult, metrics: StepLogger) -> None:
        ev = self.evaluate()
        result.val_loss = result.val_losses[self.step] = ev["loss"]
        result.eval_metrics[self.step] = ev
        metrics.eval(self.step, ev)

    def evaluate(self) -> dict[str, float]:
        """Validation metrics now (see :class:`~llm_pipeline.train.evaluation.Evaluator`)."""
        assert self.plan is not None
        return self.evaluator.evaluate(self.plan)

    # ---- the plan and the state --------------------------------------------------------------

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

    def counters(self) -> dict[str, int]:
        return {
            "skipped_steps": self.skipped_steps,
            "empty_batches": self.empty_batches,
            "oom_events": self.oom_events,
            "tokens_seen": self.tokens_seen,
        }

    def trainer_state(self) -> dict[str, Any]:
        """The loop's state in a checkpoint (rank 0 saves it): counters, plan, schedule."""
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

    def rank_state(self) -> dict[str, Any]:
        """This rank's state in a checkpoint: data position, RNG, objective and callback states."""
        return {
            "loader": self.train_source.state_dict(),
            "rng": rng_state(),
            "objective": self.objective.state_dict(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
        }

    def _restore(self, path: Path, state: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
        """Take a loaded checkpoint's state back (the model and optimizer are already restored in place)."""
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
        if rank_state is None:
            log.warning("%s was saved with another world size: the data stream restarts on each rank", path)
        else:
            self.train_source.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"])
            self.objective.load_state_dict(rank_state.get("objective", {}))
            for cb, cb_state in zip(self.callbacks, rank_state.get("callbacks", []), strict=False):
                cb.load_state_dict(cb_state)
        # The loader state carries the shape it was saved with; a checkpoint taken on a curriculum
        # boundary (or a changed micro-batch) must switch it to the plan for the coming step.
        self.plan = None
        self.prepare()

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


def _describe(plan: StepPlan) -> str:
    rows = f"seq_len {plan.seq_len}, " if plan.seq_len is not None else ""
    return f"{rows}micro-batch {plan.micro} x {plan.accum} accumulation"
