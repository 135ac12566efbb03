"""Typed configuration of a training run: the loop (shared by every stage), parallelism, curriculum.

``TrainingConfig`` and ``ParallelConfig`` are stage-independent: SFT, DPO and LoRA configs reuse
them next to their own data/objective sections. ``PretrainConfig`` is the pretraining stage.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from llm_pipeline.config import ModelConfig, StrictModel
from llm_pipeline.data.mixture_config import MixtureFields
from llm_pipeline.train.trackers import TrackingConfig, check_tracker_names


class TrainingConfig(StrictModel):
    """The loop: batch size in tokens, optimizer, schedule, cadences, safety nets, outputs."""

    max_steps: int = Field(1000, gt=0, description="Optimizer steps to run.")
    num_epochs: float | None = Field(
        None,
        gt=0,
        description="Example-aligned stages (SFT, DPO): passes over the training data; sets max_steps from the "
        "data's size (--max_steps on the command line clears it).",
    )
    global_batch_tokens: int = Field(
        524288,
        gt=0,
        description="Token-stream stages (pretraining): tokens per optimizer step over all ranks; constant across "
        "the curriculum.",
    )
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Example-aligned stages: rows per optimizer step over all ranks (packed sequences for SFT, "
        "pairs for DPO).",
    )
    micro_batch_size: int = Field(
        8,
        gt=0,
        description="Rows per forward (token streams: at the first curriculum length; later lengths keep its tokens).",
    )
    loss_chunk_tokens: int = Field(
        2048,
        ge=0,
        description="LM head + cross-entropy in chunks of this many tokens, so fp32 logits never exist for a whole "
        "micro-batch; 0 = one chunk.",
    )
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    lr_schedule: Literal["cosine", "linear", "wsd", "constant"] = Field(
        "cosine", description="After warmup: cosine or linear decay to min_lr_ratio, warmup-stable-decay, or constant."
    )
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps from 0 to the peak.")
    warmup_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Warmup as a fraction of max_steps (replaces warmup_steps; follows max_steps when num_epochs "
        "sets it).",
    )
    wsd_decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: share of steps spent decaying at the end.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay on matrices (never on norms, biases, embeddings).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW first-moment decay.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW second-moment decay (0.95 is steadier for LLMs).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 disables clipping.")
    z_loss_weight: float = Field(0.0, ge=0, description="Weight of the z-loss (logsumexp² of the logits); 0 = off.")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="bf16 autocast / FSDP param dtype, or fp32.")
    seed: int = Field(0, description="Seed for model init and every random generator of the loop.")
    logging_steps: int = Field(10, gt=0, description="Log metrics every N steps.")
    eval_steps: int = Field(500, ge=0, description="Validation loss/perplexity every N steps; 0 = never.")
    eval_batches: int = Field(20, gt=0, description="Micro-batches in one validation pass (the same each time).")
    save_steps: int = Field(1000, ge=0, description="Checkpoint every N steps; 0 = only at the end.")
    save_total_limit: int = Field(3, gt=0, description="Keep the newest N committed checkpoints.")
    async_save: bool = Field(False, description="Write checkpoints in the background (committed on completion).")
    output_dir: Path = Field(Path("checkpoints/pretrain"), description="Checkpoint folders checkpoint-<step>.")
    final_dir: Path | None = Field(None, description="HF export of the final model; default <output_dir>_final.")
    logging_dir: Path | None = Field(None, description="TensorBoard + metrics.jsonl; default <output_dir>/logs.")
    trackers: list[str] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        description="Where metrics go, several at once: jsonl (always: the report reads it), tensorboard, wandb, "
        "mlflow, trackio (the last three: pip install 'llm-pipeline[trackers]').",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Run name and per-tracker options.")
    resume_from_checkpoint: str | None = Field(
        None, description="'auto' (newest valid checkpoint in output_dir, if any) or a checkpoint folder."
    )
    enable_oom_recovery: bool = Field(False, description="On OOM halve the micro-batch, keep the global batch.")
    max_consecutive_skips: int = Field(
        5, gt=0, description="Non-finite loss/grad steps in a row before the run stops with a checkpoint."
    )
    verify_checksums: bool = Field(
        True, description="Check a checkpoint's files against its checksum manifest before resuming from it."
    )
    max_empty_batches: int = Field(
        10,
        gt=0,
        description="Global batches in a row with nothing to train on (all labels masked) before the run stops.",
    )

    @field_validator("trackers")
    @classmethod
    def _check_trackers(cls, names: list[str]) -> list[str]:
        return check_tracker_names(names)

    @model_validator(mode="after")
    def _check_tracking(self) -> TrainingConfig:
        self.tracking.check_used_by(self.trackers)
        return self

    @model_validator(mode="after")
    def _check_warmup(self) -> TrainingConfig:
        if self.warmup_ratio is not None and "warmup_steps" in self.model_fields_set:
            raise ValueError("set training.warmup_steps or training.warmup_ratio, not both")
        return self

    @property
    def resolved_warmup_steps(self) -> int:
        """Warmup in steps: ``warmup_ratio`` of ``max_steps`` when given, else ``warmup_steps``."""
        if self.warmup_ratio is not None:
            return round(self.warmup_ratio * self.max_steps)
        return self.warmup_steps

    @property
    def resolved_final_dir(self) -> Path:
        return self.final_dir or self.output_dir.with_name(self.output_dir.name + "_final")

    @property
    def resolved_logging_dir(self) -> Path:
        return self.logging_dir or self.output_dir / "logs"


class ParallelConfig(StrictModel):
    """How the model is applied to hardware; the model file knows nothing of this."""

    fsdp: bool = Field(True, description="Shard each block with FSDP2 when launched on several ranks.")
    reshard_after_forward: bool = Field(True, description="FSDP2: free gathered params after forward (ZeRO-3).")
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="Recompute activations: every block (full), or keep matmul outputs only (selective)."
    )
    compile: bool = Field(False, description="torch.compile each transformer block.")
    fp8: bool | None = Field(
        None, description="torchao float8 training: null = auto (on H100-class GPUs), true = require, false = off."
    )
    fp8_recipe: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = Field(
        "tensorwise",
        description="torchao float8 scaling recipe; only tensorwise all-gathers FSDP2 weights in float8.",
    )
    fp8_emulate: bool = Field(
        False,
        description="Run float8 training without FP8 hardware (torchao emulate: float8 casts and scales, fp32 "
        "matmuls), to exercise the FP8 path on CPU; turns FP8 on unless fp8 is false; refused on FP8 GPUs.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present, else CPU.")


class CurriculumStage(StrictModel):
    """From ``step`` on, train on rows of ``seq_len`` tokens."""

    step: int = Field(ge=0, description="First optimizer step (0-based count of finished steps) of this stage.")
    seq_len: int = Field(gt=0, description="Tokens per row from that step on.")


class ModelSource(StrictModel):
    """Where the weights come from: a preset with random init, or an HF directory."""

    preset: str | None = Field("tiny", description="Name in llm_pipeline.model.PRESETS (random init).")
    init_from: Path | None = Field(None, description="HF model directory to start from (overrides preset).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="ModelConfig fields changed on the preset.")
    init_digest: str | None = Field(
        None,
        description="Recorded by the stage runner (any value given is replaced): the content digest of init_from's "
        "config and weight files, saved with each checkpoint of a stage that needs the same start model to "
        "resume (LoRA's frozen base, DPO's reference), so that a start model changed in place is noticed.",
    )

    @model_validator(mode="after")
    def _check_architecture(self) -> ModelSource:
        # Checked at load time, so a typo in a preset name or an override key is reported with the file.
        if self.init_from is not None:
            if self.overrides:
                raise ValueError("overrides cannot be combined with init_from (the architecture is its config.json)")
            return self
        if self.preset is None:
            raise ValueError("set preset or init_from")
        from llm_pipeline.model.presets import PRESETS

        if self.preset not in PRESETS:
            hint = difflib.get_close_matches(self.preset, list(PRESETS), n=1)
            raise ValueError(
                f"unknown preset {self.preset!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                f"choose one of: {', '.join(PRESETS)}"
            )
        unknown = sorted(set(self.overrides) - set(ModelConfig.model_fields))
        if unknown:
            hints = [difflib.get_close_matches(k, list(ModelConfig.model_fields), n=1) for k in unknown]
            named = ", ".join(
                f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in zip(unknown, hints, strict=True)
            )
            raise ValueError(f"unknown override key(s) {named}; allowed: {', '.join(ModelConfig.model_fields)}")
        self.resolve()  # shape rules (heads divide hidden size, ...) on the final architecture
        return self

    def resolve(self) -> ModelConfig:
        from llm_pipeline.model import get_preset

        if self.preset is None:
            raise ValueError("model.preset is null and no model.init_from is given")
        return get_preset(self.preset, **self.overrides)


class PretrainDataConfig(MixtureFields, StrictModel):
    """Packed token shards written by ``llm-pipeline data prepare``: one folder, or a weighted mixture of several
    (``sources``: each a name, a weight or ``tokens`` budget, and its own ``path``/``train_split``/``val_split``;
    a key a source leaves out is this section's)."""

    path: Path = Field(Path("runs/data/packed"), description="Folder of packed train/val shards.")
    tokenizer_dir: Path | None = Field(None, description="Tokenizer copied into the final HF export.")
    train_split: str = Field("train", description="Split trained on.")
    val_split: str | None = Field(
        "val", description="Split for validation loss/perplexity (skipped if absent; null: no validation)."
    )


def default_curriculum() -> list[CurriculumStage]:
    return [CurriculumStage(step=0, seq_len=512)]


class StageConfig(StrictModel):
    """What every training stage's config holds: the starting model, the loop and the parallelism.

    A stage's config subclasses it and adds its own sections (data, loss, adapters). The class
    variables say how its global batch is counted and what a resume may change.
    """

    #: "tokens" (training.global_batch_tokens, token streams) or the name of a row unit
    #: ("sequences", "pairs": training.global_batch_size, example-aligned sources).
    batch_unit: ClassVar[str] = "tokens"
    #: training.output_dir when the config does not name one.
    default_output_dir: ClassVar[str] = "checkpoints/pretrain"
    #: Sections (or keys) whose changes a resume applies; every other key must match the checkpoint's.
    #: ``model.init_from`` only chose the first weights: a checkpoint that holds every weight replaces
    #: them (a stage that does not save frozen weights, like LoRA, lists it in ``fixed_on_resume``).
    mutable_on_resume: ClassVar[tuple[str, ...]] = ("training", "parallel", "model.init_from")
    #: Keys inside those sections that must still match (they decide the data order or the weights).
    fixed_on_resume: ClassVar[tuple[str, ...]] = ("training.seed",)

    model: ModelSource = Field(default_factory=ModelSource)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    @model_validator(mode="after")
    def _check_batch_unit(self) -> StageConfig:
        t = self.training
        if self.batch_unit == "tokens":
            if t.global_batch_size is not None:
                raise ValueError(
                    "training.global_batch_size is for example-aligned stages; this stage counts its batch in "
                    "tokens: set training.global_batch_tokens"
                )
            if t.num_epochs is not None:
                raise ValueError("training.num_epochs is for example-aligned stages; set training.max_steps")
        else:
            # A resolved config (save_config) holds the default token batch: only another value is a mistake.
            default_tokens = TrainingConfig.model_fields["global_batch_tokens"].default
            if "global_batch_tokens" in t.model_fields_set and t.global_batch_tokens != default_tokens:
                raise ValueError(
                    f"this stage counts its batch in {self.batch_unit}: set training.global_batch_size, "
                    "not training.global_batch_tokens"
                )
            if t.global_batch_size is None:
                raise ValueError(f"set training.global_batch_size ({self.batch_unit} per optimizer step)")
        if "output_dir" not in t.model_fields_set:
            t.output_dir = Path(self.default_output_dir)
        return self


class PretrainConfig(StageConfig):
    """``configs/pretrain.yaml``: model + data + loop + parallelism + context-length curriculum."""

    mutable_on_resume: ClassVar[tuple[str, ...]] = ("training", "parallel", "model.init_from", "curriculum")

    data: PretrainDataConfig = Field(default_factory=PretrainDataConfig)
    curriculum: list[CurriculumStage] = Field(
        default_factory=default_curriculum, description="Sequence length by step; first stage at step 0."
    )

    @model_validator(mode="after")
    def _check_curriculum(self) -> PretrainConfig:
        check_curriculum(self.curriculum, self.training.global_batch_tokens)
        return self


def check_curriculum(stages: list[CurriculumStage], global_batch_tokens: int) -> None:
    """Stages start at 0, ascend, and every length divides the global batch (tokens per step constant)."""
    if not stages:
        raise ValueError("curriculum needs at least one stage, e.g. [{step: 0, seq_len: 2048}]")
    if stages[0].step != 0:
        raise ValueError(f"curriculum must start at step 0, first stage starts at step {stages[0].step}")
    steps = [s.step for s in stages]
    if steps != sorted(set(steps)):
        raise ValueError(f"curriculum steps must be strictly increasing, got {steps}")
    for s in stages:
        if global_batch_tokens % s.seq_len:
            raise ValueError(
                f"training.global_batch_tokens ({global_batch_tokens}) must be a multiple of every curriculum "
                f"seq_len so tokens per step stay constant; {s.seq_len} does not divide it"
            )
