"""The DPO stage: preference pairs + the DPO family of losses against the frozen start model.

``llm-pipeline dpo --config configs/dpo.yaml`` (``scripts/09_dpo.py``). The start model
(``model.init_from``, usually ``sft_final``) is the policy's initial weights, its tokenizer and chat
template encode the pairs (:mod:`llm_pipeline.data.preference`), and it is the reference model:
its log-probs of every training and validation pair are computed once before the loop and cached
beside the run (:mod:`llm_pipeline.train.dpo_reference`), or, with ``dpo.reference: live``, a
frozen copy runs next to the policy. Losses and metrics: :mod:`llm_pipeline.train.dpo_loss`.
The final model is exported to ``<output_dir>_final`` with the start model's tokenizer and template.
From Python: ``run_stage(DPOStage(load_config(DPOConfig, "configs/dpo.yaml")))``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from llm_pipeline.config import ModelConfig, StrictModel
from llm_pipeline.data.config import PreferenceDataConfig
from llm_pipeline.data.preference import PreferenceBatchSource
from llm_pipeline.train.batching import BatchSource
from llm_pipeline.train.chat_stage import ChatStage
from llm_pipeline.train.config import StageConfig
from llm_pipeline.train.dpo_loss import LOSS_TYPES, DPOObjective, LossType
from llm_pipeline.train.objectives import Objective
from llm_pipeline.train.parallel import DistInfo

log = logging.getLogger(__name__)

#: Loss types that read ``label_smoothing``.
SMOOTHED = ("sigmoid", "robust", "dpo_norm")


class DPOLossConfig(StrictModel):
    """The ``dpo:`` section: which losses, their temperature, and where the reference log-probs come from."""

    loss_type: list[LossType] = Field(
        default_factory=lambda: ["sigmoid"],
        description=f"One or several of {', '.join(LOSS_TYPES)} (a list combines them with loss_weights).",
    )
    loss_weights: list[float] | None = Field(
        None, description="Weight of each loss_type (same length); default 1 each."
    )
    beta: float = Field(
        0.1, gt=0, description="Temperature β of the implicit reward β·log(π/π_ref); Tulu 3 uses 5 with dpo_norm."
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed share ε of flipped labels: conservative DPO (sigmoid, dpo_norm) or robust DPO (robust).",
    )
    sft_weight: float = Field(
        0.0, ge=0, description="Weight of the chosen completion's mean token NLL added to the loss (TRL's rpo_alpha)."
    )
    reference: Literal["cached", "live"] = Field(
        "cached",
        description="cached: the start model's log-probs computed once before training and stored in "
        "<output_dir>/reference; live: a frozen copy of the start model scores every batch.",
    )

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> DPOLossConfig:
        if not self.loss_type:
            raise ValueError(f"dpo.loss_type needs at least one of {', '.join(LOSS_TYPES)}")
        repeated = sorted({t for t in self.loss_type if self.loss_type.count(t) > 1})
        if repeated:
            raise ValueError(f"dpo.loss_type lists {', '.join(repeated)} more than once; use loss_weights instead")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"dpo.loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss types"
            )
        if self.label_smoothing and not set(self.loss_type) & set(SMOOTHED):
            raise ValueError(
                f"dpo.label_smoothing applies to {', '.join(SMOOTHED)}; {', '.join(self.loss_type)} would ignore it"
            )
        return self


class DPOConfig(StageConfig):
    """``configs/dpo.yaml``: start model + preference data + the loop + parallelism + the ``dpo`` loss section."""

    batch_unit: ClassVar[str] = "pairs"
    default_output_dir: ClassVar[str] = "checkpoints/dpo"
    #: The start model is also the reference the policy is measured against: it cannot change mid-run.
    fixed_on_resume: ClassVar[tuple[str, ...]] = ("training.seed", "model.init_from")

    data: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)
    dpo: DPOLossConfig = Field(default_factory=DPOLossConfig)

    @model_validator(mode="after")
    def _check_start_model(self) -> DPOConfig:
        if self.model.init_from is None:
            raise ValueError(
                "DPO starts from a trained model: set model.init_from to an HF model folder with its tokenizer "
                "(e.g. checkpoints/sft_final); its chat template encodes the pairs and it is the reference model"
            )
        return self


class DPOStage(ChatStage):
    kind = "dpo"
    report_metrics = ("loss", "rewards/accuracies", "rewards/margins", "chosen_nll")
    config_class = DPOConfig
    cfg: DPOConfig
    rows_per_unit = 2  # a pair is a chosen and a rejected row
    # The policy continues from the checkpoint while the reference is the start model: both must be the same one.
    resume_needs_same_start = True

    def __init__(self, cfg: DPOConfig) -> None:
        super().__init__(cfg)
        self.reference_model: nn.Module | None = None
        self.reference_report: dict[str, Any] = {}

    def data_builder(self) -> Any:
        from llm_pipeline.data.preference import build_preference_sources

        return build_preference_sources

    def encoding_tokenizer(self) -> Path:
        tok = self.tokenizer_dir()
        if tok is None:
            raise FileNotFoundError(
                f"model.init_from {self.cfg.model.init_from} has no tokenizer.json: DPO encodes the pairs with the "
                "start model's own tokenizer and chat template (export the start model with its tokenizer)"
            )
        return tok

    def build_sources(self, info: DistInfo, model_cfg: ModelConfig) -> tuple[BatchSource, BatchSource | None]:
        train, val = self.build_data(info, self.encoding_tokenizer())
        return train, val if self.cfg.training.eval_steps else None

    def check_data(self, train_source: BatchSource, model_cfg: ModelConfig) -> None:
        for name, src in _parts(train_source, "train").items():
            if not isinstance(src, PreferenceBatchSource):
                raise TypeError(f"the DPO stage trains on a PreferenceBatchSource, got {type(src).__name__} ({name})")
            pairs = src.pairs
            top = max(int(side.tokens.max(initial=0)) for side in (pairs.chosen, pairs.rejected))
            self.check_token_ids(top, model_cfg, "preference data")

    def prepare(
        self, model: nn.Module, info: DistInfo, train_source: BatchSource, val_source: BatchSource | None = None
    ) -> None:
        """The reference: a frozen copy of the start model (live), or its log-probs of every pair (cached)."""
        cfg, t = self.cfg, self.cfg.training
        if cfg.dpo.reference == "live":
            from llm_pipeline.train.model_setup import build_training_model, resolve_model_config

            ref = build_training_model(
                resolve_model_config(cfg.model), cfg.parallel, info, precision=t.precision, fp8=False, seed=t.seed,
                init_from=cfg.model.init_from,
            )  # fmt: skip
            self.reference_model = ref.requires_grad_(False).eval()
            return
        from llm_pipeline.train.dpo_reference import load_or_compute_reference

        sources: dict[str, PreferenceBatchSource] = {}
        for split, whole in (("train", train_source), ("val", val_source)):
            for key, src in (_parts(whole, split) if whole is not None else {}).items():
                if not isinstance(src, PreferenceBatchSource):
                    raise TypeError(f"a cached DPO reference needs PreferenceBatchSource data; the {key} source is not")
                sources[key] = src
        tables, self.reference_report = load_or_compute_reference(
            model,
            sources,
            info,
            cache_dir=Path(t.output_dir) / "reference",
            components=lambda: self.reference_components(model),
            micro_batch_size=t.micro_batch_size,
            precision=t.precision,
            chunk_tokens=t.loss_chunk_tokens,
        )
        for split, src in sources.items():
            tables[split].attach_to(src)

    def reference_components(self, model: nn.Module) -> dict[str, Any]:
        """What the reference log-probs of every split depend on (hashed into the cache keys with the split's data)."""
        from llm_pipeline.train.dpo_reference import tokenizer_digest

        cfg = self.cfg
        return {
            "format": "dpo-reference-v1",
            "model": self.inputs_digest(),
            "tokenizer": tokenizer_digest(self.tokenizer_dir()),
            "lengths": {"max_seq_len": cfg.data.max_seq_len, "max_prompt_len": cfg.data.max_prompt_len},
            "precision": cfg.training.precision,
            "float8": any(type(m).__name__ == "Float8Linear" for m in model.modules()),
        }

    def build_objective(self, model_cfg: ModelConfig) -> Objective:
        d = self.cfg.dpo
        return DPOObjective(
            d.loss_type,
            d.loss_weights,
            beta=d.beta,
            label_smoothing=d.label_smoothing,
            sft_weight=d.sft_weight,
            reference_model=self.reference_model,
            chunk_tokens=self.cfg.training.loss_chunk_tokens,
        )


def _parts(source: BatchSource, split: str) -> dict[str, BatchSource]:
    """The preference sources behind ``source``: itself (key ``split``), or a mixture's (``split.<name>``),
    each with its own reference table."""
    inner = getattr(source, "sources", None)
    if isinstance(inner, dict):
        return {f"{split}.{name}": src for name, src in inner.items()}
    return {split: source}
