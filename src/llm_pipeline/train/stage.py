"""The stage runner: every training stage is a small definition run by :func:`run_stage`.

A stage is

- a typed config (a :class:`~llm_pipeline.train.config.StageConfig` subclass),
- an :class:`~llm_pipeline.train.objectives.Objective` (loss, units, cost),
- a batch source (token windows, packed examples, preference pairs; each resumable),
- an optional model transform (e.g. LoRA adapters), applied after the weights load and before
  parallelisation, with a float8 filter that keeps its own modules out,
- exports (the HF model; adapters; a merged model), written from the gathered weights.

:func:`run_stage` owns everything else: distributed setup, seeding, the model (preset or HF
directory, FSDP2, float8, compile, activation checkpointing), the one training loop with its
resume and checkpoints, and the exports. A new stage never copies any of it; see
``llm_pipeline/train/pretrain.py`` for the smallest complete stage. :data:`STAGE_KINDS` maps the
names used on the command line and in ``configs/pipeline.yaml`` to stage classes
(:func:`register_stage_kind` adds one).

The stage class is the only owner of what a stage knows. Pre-flight, the pipeline, the CLI and the
export ask it through class hooks, never by testing its kind: ``input_checks`` / ``data_quality``
(its inputs, checked before anything runs), ``memory_plan`` / ``checkpoint_bytes`` / ``export_bytes``
(its size), ``export_paths`` (what it writes), ``inputs_digest`` (the identity of what it trains from,
for the pipeline's fingerprint), ``owns_checkpoint`` / ``load_for_export`` (a training checkpoint
back to a model).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from llm_pipeline.config import ModelConfig, save_config
from llm_pipeline.hardware import Check, warn_if_cpu_oversubscribed
from llm_pipeline.model.flops import count_parameters
from llm_pipeline.train.batching import Batching, BatchSource, RowBatching
from llm_pipeline.train.config import StageConfig
from llm_pipeline.train.kinds import STAGE_KINDS, STAGE_SUMMARIES
from llm_pipeline.train.mixture import check_mixture_plan, mixture_callbacks
from llm_pipeline.train.model_setup import (
    build_training_model,
    gather_model_state,
    resolve_model_config,
    write_hf_model,
)
from llm_pipeline.train.objectives import Objective
from llm_pipeline.train.parallel import DistInfo, any_rank, barrier, init_distributed, reshard_all, resolve_fp8
from llm_pipeline.train.stage_inputs import InputContext, MemoryPlan
from llm_pipeline.train.trackers import require_tracker_packages
from llm_pipeline.train.trainer import Callback, Trainer, TrainingError, TrainResult

log = logging.getLogger(__name__)


def register_stage_kind(kind: str, target: str, summary: str) -> None:
    """Add (or replace) a stage kind: ``target`` is ``"package.module:Class"``, imported on first use.

    That is all a new kind needs: the pipeline config, ``llm-pipeline preflight``, ``export`` and the
    report find it through the registry (the CLI builds its subcommands from it at start-up).
    """
    module, sep, name = target.partition(":")
    if not kind or not sep or not module or not name:
        raise ValueError(f"register_stage_kind({kind!r}, {target!r}): expected a kind and 'package.module:Class'")
    STAGE_KINDS[kind] = target
    STAGE_SUMMARIES[kind] = summary


def stage_class(kind: str) -> type[Stage]:
    """The stage class registered under ``kind``."""
    if kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {kind!r}; known kinds: {', '.join(STAGE_KINDS)}")
    module, name = STAGE_KINDS[kind].split(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise TypeError(f"stage kind {kind!r}: {STAGE_KINDS[kind]} is not a Stage subclass")
    return cls


def load_checkpoint_for_export(path: str | Path) -> tuple[nn.Module, Path, str, Path | None]:
    """The plain model of a training checkpoint, loaded by the stage kind that wrote it.

    Returns the model, the checkpoint folder used, a short note on how it was loaded and the tokenizer the
    run trained with (the one the kind wrote beside its checkpoints, else the run's data or start model's). The kind is
    the first registered one whose :meth:`Stage.owns_checkpoint` accepts the saved ``config.yaml``; a
    checkpoint no kind recognises is read as one that holds every weight.
    """
    from llm_pipeline.checkpoint.dcp import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    saved = saved_run_config(ckpt)
    owner: type[Stage] = Stage
    for kind in STAGE_KINDS:
        cls = stage_class(kind)
        if cls.owns_checkpoint(saved):
            owner = cls
            break
    from llm_pipeline.checkpoint.dcp import checkpoint_tokenizer_dir

    model, note = owner.load_for_export(ckpt)
    written = owner.written_tokenizer_dirs(ckpt.parent)
    return model, ckpt, note, checkpoint_tokenizer_dir(ckpt, written=written)


def saved_run_config(ckpt: Path) -> dict[str, Any]:
    """The run config saved in a checkpoint (``config.yaml``; empty when there is none)."""
    import yaml

    from llm_pipeline.config import ConfigError

    file = Path(ckpt) / "config.yaml"
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{file}: unreadable ({e}); the checkpoint is damaged") from None
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class Export:
    """One output of a finished stage, written on rank 0 from the gathered full state dict."""

    name: str  # "model" (the HF directory the next stage starts from), "adapter", ...
    path: Path
    write: Callable[[dict[str, torch.Tensor]], Path]


@dataclass(frozen=True)
class WiringContext:
    """What the pipeline knows when it wires a stage's config (paths of earlier outputs)."""

    run_dir: Path
    stage_name: str
    start_dir: Path | None  # the model the stage starts from (None: the config's own model section)
    packed_dir: Path | None  # the data stage's packed shards
    tokenizer_dir: Path | None  # the data stage's tokenizer


class Stage(ABC):
    """One training stage: override the hooks below; :func:`run_stage` does the rest."""

    #: Name on the command line (``llm-pipeline <kind>``) and in the pipeline config.
    kind: ClassVar[str]
    config_class: ClassVar[type[StageConfig]]
    #: False: checkpoints hold only trainable weights (+ their optimizer state); the frozen ones are
    #: reloaded from the starting model on resume.
    save_frozen_params: ClassVar[bool] = True
    #: Its own held-out metrics (``metrics.jsonl`` eval rows) the report shows, before its first step -> after.
    report_metrics: ClassVar[tuple[str, ...]] = ("loss", "ppl")
    #: True: a checkpoint is only valid on the very start model it was trained from (frozen weights
    #: reloaded from it, or a reference computed from it). The runner records the start model's content
    #: digest (``model.init_digest``) with every checkpoint, and a resume on changed files is refused.
    resume_needs_same_start: ClassVar[bool] = False

    def __init__(self, cfg: StageConfig) -> None:
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg

    # ---- what every stage defines ------------------------------------------------------------

    @abstractmethod
    def build_sources(self, info: DistInfo, model_cfg: ModelConfig) -> tuple[BatchSource, BatchSource | None]:
        """Train and (optional) validation sources, each reading this rank's share."""

    @abstractmethod
    def build_objective(self, model_cfg: ModelConfig) -> Objective:
        """The loss of this stage."""

    # ---- optional hooks ------------------------------------------------------------------------

    def extra_val_sources(self) -> dict[str, BatchSource]:
        """Further held-out sets (built by :meth:`build_sources`), evaluated with the validation source and
        logged as ``<name>_loss``/``<name>_ppl``: e.g. general data during fine-tuning (forgetting)."""
        return {}

    def batching(self) -> Batching:
        """How a step is cut; example-aligned stages count rows of their ``batch_unit``."""
        t = self.cfg.training
        assert t.global_batch_size is not None  # StageConfig checks it for row units
        return RowBatching(t.global_batch_size, t.micro_batch_size, unit=self.cfg.batch_unit)

    def model_config(self) -> ModelConfig:
        """The architecture to train: the preset, or ``model.init_from``'s config.json.

        A stage may change it (SFT grows the vocabulary for chat tokens); its :meth:`transform` then
        brings the loaded weights to that shape.
        """
        return resolve_model_config(self.cfg.model)

    def transform(self, model: nn.Module) -> nn.Module:
        """Change the model after its weights load and before parallelisation (e.g. add adapters).

        Must be deterministic and also work on a ``meta`` model (FSDP2 builds shapes first).
        """
        return model

    def fp8_filter(self, module: nn.Module, fqn: str) -> bool:
        """False keeps a module out of float8 (e.g. the transform's adapters)."""
        return True

    def check_data(self, train_source: BatchSource, model_cfg: ModelConfig) -> None:  # noqa: B027 - optional
        """Fail early when the data cannot fit the model (e.g. token ids beyond its vocabulary)."""

    def prepare(  # noqa: B027 - optional hook
        self, model: nn.Module, info: DistInfo, train_source: BatchSource, val_source: BatchSource | None = None
    ) -> None:
        """Work on the starting weights before the loop starts and before a checkpoint is loaded (e.g. DPO's
        reference log-probs of the training and validation data). Collective: every rank calls it."""

    def callbacks(self) -> list[Callback]:
        return []

    def tokenizer_dir(self) -> Path | None:
        """Tokenizer copied into the exports: by default the starting model's own.

        Answers the same before and after :meth:`build_sources` (which may write the folder it names).
        """
        init = self.cfg.model.init_from
        return init if init is not None and (Path(init) / "tokenizer.json").is_file() else None

    def export_paths(self) -> dict[str, Path]:
        """Where the exports go, by name (``model``: the HF directory the next stage starts from)."""
        return {"model": self.cfg.training.resolved_final_dir}

    def exports(self, model_cfg: ModelConfig) -> list[Export]:
        """The HF model at ``<output_dir>_final`` (bf16 when trained in bf16)."""
        t = self.cfg.training
        out = self.export_paths()["model"]
        dtype = torch.bfloat16 if t.precision == "bf16" else None

        def write(state: dict[str, torch.Tensor]) -> Path:
            return write_hf_model(
                state, model_cfg, out, tokenizer_dir=self.tokenizer_dir(), dtype=dtype, metadata={"stage": self.kind}
            )

        return [Export("model", out, write)]

    @classmethod
    def pipeline_wiring(cls, ctx: WiringContext) -> dict[str, Any]:
        """Config keys the pipeline sets for this stage beyond the common ones (data paths...)."""
        return {}

    # ---- what pre-flight and the pipeline ask (nothing is trained or allocated) -------------------

    def inputs_digest(self) -> str:
        """Identity of what this stage trains from, by content (the pipeline's fingerprint of its inputs).

        By default the start model: its config and weight files, or a preset's config and seed.
        """
        from llm_pipeline.train.model_setup import start_model_digest

        return start_model_digest(self.cfg.model, self.cfg.training.seed)

    def input_checks(self, ctx: InputContext) -> list[Check]:
        """Every input the stage reads, checked before anything runs (present, or written by an earlier
        pipeline step: ``ctx.produced``); a missing one is a BLOCKER naming the path and how to make it.
        By default the start model; stages add their data, tokenizer and vocabulary checks."""
        model = self.cfg.model
        n = count_parameters(ctx.model) if ctx.model is not None else 0
        return [ctx.start_model(model.init_from, f"random init of preset {model.preset} ({n:,} parameters)")]

    def data_quality(self, ctx: InputContext) -> Check | None:
        """A sample of the data built as training would, counting what it loses (None: nothing to check)."""
        return None

    def memory_plan(self, model_cfg: ModelConfig) -> MemoryPlan:
        """One micro-batch's rows and their length, and what trains (the memory estimate's inputs)."""
        return MemoryPlan(rows=self.cfg.training.micro_batch_size, seq_len=model_cfg.max_position_embeddings)

    def checkpoint_bytes(self, model_cfg: ModelConfig) -> int:
        """Size of one checkpoint: the fp32 weights it saves (frozen ones only with ``save_frozen_params``),
        two fp32 AdamW moments per trainable weight, and the small state files."""
        from llm_pipeline.train.stage_inputs import CHECKPOINT_BYTES_PER_TENSOR, CHECKPOINT_FIXED_BYTES

        total, tensors = parameter_counts(model_cfg)
        plan = self.memory_plan(model_cfg)
        trainable = total if plan.trainable_params is None else plan.trainable_params
        trainable_tensors = tensors if plan.trainable_tensors is None else plan.trainable_tensors
        saved = total if self.save_frozen_params else trainable
        saved_tensors = tensors if self.save_frozen_params else trainable_tensors
        entries = saved_tensors + 3 * trainable_tensors  # the weights; exp_avg, exp_avg_sq and step of the trained
        return saved * 4 + trainable * 8 + CHECKPOINT_FIXED_BYTES + entries * CHECKPOINT_BYTES_PER_TENSOR

    def export_bytes(self, model_cfg: ModelConfig) -> int:
        """Size of the exports (the HF model; bf16 when trained in bf16)."""
        return count_parameters(model_cfg) * (2 if self.cfg.training.precision == "bf16" else 4)

    # ---- a training checkpoint back to a model (``llm-pipeline export CKPT OUT``) -------------------

    @classmethod
    def owns_checkpoint(cls, saved: dict[str, Any]) -> bool:
        """Whether a checkpoint whose saved run config is ``saved`` was written by this kind."""
        from llm_pipeline.config import ConfigError, validate_config

        if not saved:
            return False
        try:
            validate_config(cls.config_class, dict(saved), "checkpoint config.yaml")
        except (ConfigError, ValueError, TypeError):
            return False
        return True

    @classmethod
    def written_tokenizer_dirs(cls, output_dir: Path) -> tuple[Path, ...]:
        """Tokenizer folders this kind may write into its ``output_dir`` when it changes the one it starts from
        (SFT's chat tokens, LoRA's template): what an export of its checkpoints ships, when present."""
        return ()

    @classmethod
    def load_for_export(cls, ckpt: Path) -> tuple[nn.Module, str]:
        """The plain model of one of this kind's checkpoints, and a note on how it was loaded.

        By default a checkpoint that holds every weight; a kind that saves only its trainable weights
        rebuilds the rest (LoRA: its base).
        """
        from llm_pipeline.checkpoint.dcp import load_model_from_checkpoint

        model, _ = load_model_from_checkpoint(ckpt)
        return model, ""

    # ---- the runner ---------------------------------------------------------------------------------

    def record_start_model(self, info: DistInfo) -> None:
        """Put the start model's content digest in the config saved with every checkpoint (stages whose
        checkpoints depend on it), so that the resume check refuses a start model changed in place."""
        model = self.cfg.model
        if not self.resume_needs_same_start or model.init_from is None:
            model.init_digest = None
            return
        from llm_pipeline.train.model_setup import start_model_digest

        digest = [start_model_digest(model, self.cfg.training.seed) if info.is_main else None]
        if info.distributed:
            import torch.distributed as dist

            dist.broadcast_object_list(digest, src=0)
        model.init_digest = digest[0]


def parameter_counts(model_cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, parameter tensors) of the architecture, counted on a ``meta`` model (nothing allocated)."""
    return _parameter_counts(model_cfg.model_dump_json())


@functools.lru_cache(maxsize=16)
def _parameter_counts(model_json: str) -> tuple[int, int]:
    from llm_pipeline.model.llama import build_model

    model = build_model(ModelConfig.model_validate_json(model_json), device="meta", init=False)
    return sum(p.numel() for p in model.parameters()), sum(1 for _ in model.parameters())


def _check_resumable(cfg: StageConfig) -> None:
    """Refuse now a resume that the checkpoint's saved config refuses (the trainer checks it again on load)."""
    from llm_pipeline.checkpoint.dcp import list_checkpoints, resolve_resume
    from llm_pipeline.train.resume import check_resume_config

    t = cfg.training
    path = resolve_resume(t.resume_from_checkpoint, t.output_dir)
    if path is not None:
        check_resume_config(path, cfg)
    elif earlier := list_checkpoints(t.output_dir):  # the trainer refuses a fresh start over them: say it first
        raise TrainingError(
            f"{t.output_dir} holds checkpoints of an earlier run (newest: {earlier[-1][1].name}): resume it "
            "with --resume_from_checkpoint auto, or choose another --output_dir"
        )


def _resolve_epochs(cfg: StageConfig, source: BatchSource, info: DistInfo) -> None:
    t = cfg.training
    if t.num_epochs is None:
        return
    rows = getattr(source, "rows_per_epoch", None)
    if rows is None or t.global_batch_size is None:
        raise ValueError("training.num_epochs needs an example-aligned data source; set training.max_steps instead")
    t.max_steps = max(1, math.ceil(t.num_epochs * rows / t.global_batch_size))
    if info.is_main:
        log.info(
            "%g epoch(s) of %d %s at %d per step: max_steps = %d",
            t.num_epochs, rows, cfg.batch_unit, t.global_batch_size, t.max_steps,
        )  # fmt: skip


def run_stage(
    stage: Stage,
    *,
    train_source: BatchSource | None = None,
    val_source: BatchSource | None = None,
    callbacks: Sequence[Callback] = (),
    export: bool = True,
) -> TrainResult:
    """Train ``stage`` per its config: resume if asked, train, checkpoint, write its exports.

    Works the same on one CPU process and under ``torchrun`` on many GPUs. Sources passed in
    replace the ones the stage would build (tests, custom data).
    """
    cfg = stage.cfg
    require_tracker_packages(cfg.training.trackers)  # a missing optional package: one line, before anything runs
    info = init_distributed(cfg.parallel.device)
    if info.is_main:
        warn_if_cpu_oversubscribed(info.device.type, log)  # OpenMP threads fighting other work: say so and how
    with _output_lock(cfg.training.output_dir, info, stage.kind):
        return _run_locked(stage, info, train_source, val_source, callbacks, export)


@contextlib.contextmanager
def _output_lock(output_dir: Path, info: DistInfo, kind: str) -> Iterator[None]:
    """Rank 0 owns ``output_dir`` for the whole stage (data reports, caches, checkpoints, exports)."""
    from llm_pipeline.checkpoint.dcp import check_training_output_dir
    from llm_pipeline.checkpoint.lock import FolderLock, FolderLocked

    lock, error = None, None
    if info.is_main:
        try:
            check_training_output_dir(output_dir)  # before the lock file: a model folder is refused untouched
            lock = FolderLock(output_dir, purpose=f"{kind} stage").acquire()
        except (FolderLocked, OSError) as e:
            error = e
    if any_rank(error is not None, info.device):
        raise error or RuntimeError(f"{output_dir}: rank 0 could not lock the output folder (see its error)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _run_locked(
    stage: Stage,
    info: DistInfo,
    train_source: BatchSource | None,
    val_source: BatchSource | None,
    callbacks: Sequence[Callback],
    export: bool,
) -> TrainResult:
    cfg = stage.cfg
    t = cfg.training
    torch.manual_seed(t.seed)
    # A resume the checkpoint refuses stops here, before this run writes any record (config.yaml, data reports,
    # rejects files) with the refused settings.
    stage.record_start_model(info)
    _check_resumable(cfg)
    fp8 = resolve_fp8(cfg.parallel.fp8, info.device, emulate=cfg.parallel.fp8_emulate)
    model_cfg = stage.model_config()
    extra_val: dict[str, BatchSource] = {}
    if train_source is None:
        train_source, built_val = stage.build_sources(info, model_cfg)
        val_source = val_source or built_val
        extra_val = stage.extra_val_sources()
    stage.check_data(train_source, model_cfg)
    _resolve_epochs(cfg, train_source, info)
    check_mixture_plan(cfg, train_source, info)  # max_steps is known now, however it was set
    if info.is_main:
        save_config(cfg, Path(t.output_dir) / "config.yaml")
    model = build_training_model(
        model_cfg,
        cfg.parallel,
        info,
        precision=t.precision,
        fp8=fp8,
        seed=t.seed,
        init_from=cfg.model.init_from,
        transform=stage.transform,
        fp8_filter=stage.fp8_filter,
    )
    stage.prepare(model, info, train_source, val_source)
    reshard_all(model)  # forwards in prepare leave FSDP's last block gathered; the optimizer needs the shards
    trainer = Trainer(
        model=model,
        objective=stage.build_objective(model_cfg),
        train_source=train_source,
        val_source=val_source,
        cfg=t,
        info=info,
        batching=stage.batching(),
        model_config=model_cfg,
        run_config=cfg,
        callbacks=[*stage.callbacks(), *mixture_callbacks(train_source), *callbacks],
        fp8=fp8,
        save_frozen_params=stage.save_frozen_params,
        lock_output_dir=False,  # held above for the whole stage
        extra_val_sources=extra_val,
        stage_name=stage.kind,
    )
    result = trainer.fit()
    if export and result.status == "completed":
        exports = stage.exports(model_cfg)
        state = gather_model_state(model)  # collective; complete on rank 0
        for ex in exports:
            if info.is_main:
                ex.write(state)
            result.exports[ex.name] = ex.path
        barrier()
        result.final_dir = result.exports.get("model")
    return result
