"""The LoRA stage: peft adapters on a frozen base, domain + general data mixed at a set ratio.

A stage definition on the runner (:mod:`llm_pipeline.train.stage`), like pretraining: the model side
is :mod:`llm_pipeline.train.lora` (``transform = apply_lora``, ``fp8_filter = lora_fp8_filter``,
checkpoints without the frozen base), the data side is the data layer's own sources mixed row by row
by :class:`~llm_pipeline.data.mixing.MixedBatchSource`:

- ``kind: tokens``: packed token shards (continued pretraining on a domain), a token stream cut into
  rows of ``data.seq_len`` (:class:`~llm_pipeline.train.batching.TokenBatching`, one length);
- ``kind: chat``: conversations with the SFT stage's template and masks
  (:func:`~llm_pipeline.data.sft.build_sft_sources`), whole packed rows
  (:class:`~llm_pipeline.train.batching.RowBatching`), loss on the assistant tokens only.

Validation is the domain's held-out split; the general data's held-out split is evaluated alongside
(``general_loss``/``general_ppl``), so forgetting is measured while it happens. Two exports: the peft
adapter folder ``<final_dir>_adapter`` (beside the merged model, named after it) and the merged HF model
``<final_dir>`` (default ``<output_dir>_final``) that the evaluation, the gates and a next stage use.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
import yaml
from pydantic import Field, model_validator
from torch import nn

from llm_pipeline.config import ConfigError, ModelConfig, StrictModel
from llm_pipeline.data.config import SFTDataConfig
from llm_pipeline.train.batching import Batching, BatchSource, TokenBatching
from llm_pipeline.train.config import CurriculumStage, StageConfig
from llm_pipeline.train.lora import LoRAConfig, apply_lora, lora_fp8_filter, save_adapter, save_merged
from llm_pipeline.train.objectives import CausalLMObjective, Objective
from llm_pipeline.train.parallel import DistInfo, all_reduce_sum
from llm_pipeline.train.stage import Export, Stage, WiringContext
from llm_pipeline.train.trainer import Callback, Trainer, TrainResult

log = logging.getLogger(__name__)

ADAPTER_SUFFIX = "_adapter"  # the adapter folder sits beside the merged model: <final_dir>_adapter


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


class TokenData(StrictModel):
    """Packed token shards (``llm-pipeline data prepare``): continued pretraining on raw text."""

    kind: Literal["tokens"]
    path: Path | None = Field(
        None, description="Folder of packed shards (with manifest.json); null = data.packed_dir (the pipeline's)."
    )
    train_split: str = Field("train", description="Split trained on.")
    val_split: str | None = Field("val", description="Held-out split (the domain's: validation loss; null = none).")


class ChatData(StrictModel):
    """Conversations rendered with the SFT stage's chat template; loss on the assistant tokens only."""

    kind: Literal["chat"]
    sft: SFTDataConfig = Field(default_factory=SFTDataConfig, description="The SFT stage's data section.")


DataSource = Annotated[TokenData | ChatData, Field(discriminator="kind")]


class LoRADataConfig(StrictModel):
    """Domain data, general data (against forgetting) and the share of rows drawn from the domain."""

    domain: DataSource = Field(description="What the adapters learn: token shards or chat data.")
    general: DataSource | None = Field(
        None, description="Mixed in against forgetting (same kind as domain); null = domain only (domain_fraction 1)."
    )
    domain_fraction: float = Field(
        0.8, ge=0, le=1, description="Probability that a row comes from the domain (0.8 = the spec's 80/20)."
    )
    seq_len: int = Field(2048, gt=0, description="Token sources: tokens per row.")
    packed_dir: Path | None = Field(
        None, description="Packed shards for token sources without a path (the pipeline wires the data stage's)."
    )
    general_validation: bool = Field(
        True, description="Also evaluate the general data's held-out split (general_loss, general_ppl)."
    )
    tokenizer_dir: Path | None = Field(
        None, description="Tokenizer for chat data and the exports; default: the base model's own."
    )

    @model_validator(mode="after")
    def _check_sources(self) -> LoRADataConfig:
        if self.general is None and self.domain_fraction < 1:
            raise ValueError(
                f"domain_fraction {self.domain_fraction} draws general rows but data.general is not set; "
                "set data.general or domain_fraction: 1.0"
            )
        if self.general is not None and self.general.kind != self.domain.kind:
            raise ValueError(
                f"data.domain is kind {self.domain.kind} and data.general kind {self.general.kind}: mixed rows "
                "must be of one kind (both token shards or both chat data)"
            )
        for name, src in (("domain", self.domain), ("general", self.general)):
            if isinstance(src, TokenData) and src.path is None and self.packed_dir is None:
                raise ValueError(f"data.{name}.path is not set and there is no data.packed_dir to fall back on")
        return self

    def token_path(self, src: TokenData) -> Path:
        path = src.path or self.packed_dir
        assert path is not None  # checked above
        return path


class LoRAStageConfig(StageConfig):
    """``configs/lora_finetune.yaml``: base model + adapters + domain/general data + loop + parallelism."""

    default_output_dir: ClassVar[str] = "checkpoints/lora"
    # A resume applies training/parallel changes only; `lora`, `data` and `model` are refused: the
    # frozen base is reloaded from model.init_from, so it must be the same model the adapters saw.
    mutable_on_resume: ClassVar[tuple[str, ...]] = ("training", "parallel")
    fixed_on_resume: ClassVar[tuple[str, ...]] = ("training.seed",)

    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    data: LoRADataConfig

    @property
    def batch_unit(self) -> str:  # type: ignore[override]
        """Token sources count the batch in tokens, chat sources in packed sequences."""
        return "tokens" if self.data.domain.kind == "tokens" else "sequences"

    @model_validator(mode="after")
    def _check_lora(self) -> LoRAStageConfig:
        if self.model.init_from is None:
            raise ValueError(
                "model.init_from is not set: LoRA adapts a trained model (an HF directory, e.g. the DPO stage's "
                "export); the pipeline sets it to the previous stage's export"
            )
        if self.lora.base_dtype == "bfloat16" and self.training.precision != "bf16":
            raise ValueError(
                "lora.base_dtype bfloat16 needs training.precision bf16 (a bf16 base in fp32 matmuls would "
                "fail); use precision bf16 or base_dtype float32"
            )
        if self.batch_unit == "tokens" and self.training.global_batch_tokens % self.data.seq_len:
            raise ValueError(
                f"training.global_batch_tokens ({self.training.global_batch_tokens}) must be a multiple of "
                f"data.seq_len ({self.data.seq_len}): a step is whole rows"
            )
        return self


# --------------------------------------------------------------------------------------------
# What the run reports: trainable parameters, the realised data mix
# --------------------------------------------------------------------------------------------


class LoRAReport(Callback):
    """The trainable parameters; the realised domain share (all ranks) in every step's metrics.

    ``mix_domain_row_fraction`` / ``mix_domain_token_fraction`` are the shares of rows and of trained
    tokens drawn from the domain since the run began (the mixer's counters resume with its state); the
    logged line averages them over its steps. The final values and the trainable count go to
    ``TrainResult.stats`` (and the pipeline's summary).
    """

    _COUNTS = ("domain_rows", "general_rows", "domain_tokens", "general_tokens")

    def __init__(self) -> None:
        self.mixer: Any = None
        self.trainable: dict[str, float] = {}

    def on_train_start(self, trainer: Trainer) -> None:
        from llm_pipeline.data.mixing import MixedBatchSource
        from llm_pipeline.train.lora import trainable_parameter_count

        source = trainer.train_source
        self.mixer = source if isinstance(source, MixedBatchSource) else None
        total = sum(p.numel() for p in trainer.model.parameters())  # global sizes, also under FSDP2
        n = trainable_parameter_count(trainer.model)  # apply_lora has logged it as the model was built
        self.trainable = {"trainable_params": float(n), "trainable_fraction": n / max(total, 1)}

    def mix(self, device: torch.device) -> dict[str, float]:
        """Realised counts and fractions over all ranks (collective: every rank calls it)."""
        if self.mixer is None:
            return {}
        local = self.mixer.stats()
        totals = all_reduce_sum(torch.tensor([local[k] for k in self._COUNTS], dtype=torch.float64, device=device))
        c = dict(zip(self._COUNTS, totals.tolist(), strict=True))
        rows, tokens = c["domain_rows"] + c["general_rows"], c["domain_tokens"] + c["general_tokens"]
        return {
            "mix_domain_row_fraction": c["domain_rows"] / rows if rows else 0.0,
            "mix_domain_token_fraction": c["domain_tokens"] / tokens if tokens else 0.0,
            **{f"mix_{k}": v for k, v in c.items()},
        }

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        mix = self.mix(trainer.device)
        metrics.update({k: v for k, v in mix.items() if k.endswith("_fraction")})

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        mix = self.mix(trainer.device)
        result.stats.update({**self.trainable, **mix})
        if mix and trainer.info.is_main:
            log.info(
                "lora: realised data mix %.3f domain rows, %.3f domain tokens (configured %.3f)",
                mix["mix_domain_row_fraction"], mix["mix_domain_token_fraction"], self.mixer.domain_fraction,
            )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


class LoRAStage(Stage):
    kind = "lora"
    config_class = LoRAStageConfig
    cfg: LoRAStageConfig
    save_frozen_params = False  # checkpoints: adapters + their optimizer state; the base is model.init_from

    def __init__(self, cfg: LoRAStageConfig) -> None:
        super().__init__(cfg)
        self._extra_val: dict[str, BatchSource] = {}
        self._parts: list[BatchSource] = []  # the unmixed train sources (for the data checks)
        self._chat_template_dir: Path | None = None

    # ---- model ---------------------------------------------------------------------------------

    def transform(self, model: nn.Module) -> nn.Module:
        return apply_lora(model, self.cfg.lora)  # type: ignore[arg-type]

    def fp8_filter(self, module: nn.Module, fqn: str) -> bool:
        return lora_fp8_filter(module, fqn)

    # ---- data ----------------------------------------------------------------------------------

    def _sources(self, name: str, src: TokenData | ChatData, info: DistInfo) -> tuple[BatchSource, BatchSource | None]:
        t, d = self.cfg.training, self.cfg.data
        if isinstance(src, TokenData):
            from llm_pipeline.train.pretrain import token_loaders

            path = d.token_path(src)
            return token_loaders(
                path, src.train_split, src.val_split if t.eval_steps else None, seq_len=d.seq_len,
                chunk_len=d.seq_len, micro_batch_size=t.micro_batch_size, seed=t.seed, info=info,
            )  # fmt: skip
        from llm_pipeline.data.sft import build_sft_sources

        tok = self.tokenizer_dir()
        if tok is None:
            raise FileNotFoundError("chat data needs a tokenizer: the base model has none; set data.tokenizer_dir")
        rejects = src.sft.rejects_path or str(t.output_dir / f"lora_{name}_rejects.jsonl")
        train, val, report = build_sft_sources(
            src.sft.model_copy(update={"rejects_path": rejects}), tok, micro_batch_size=t.micro_batch_size,
            rank=info.rank, world_size=info.world_size, seed=t.seed, output_dir=t.output_dir,
        )  # fmt: skip
        if report["chat_template"] == "default" and info.is_main:
            self._chat_template_dir = self._tokenizer_with_template(tok)
        return train, (val if t.eval_steps else None)

    def _tokenizer_with_template(self, tok: Path) -> Path:
        """The base's tokenizer plus the default chat template the data was rendered with (for the exports)."""
        import shutil

        from llm_pipeline.checkpoint.hf import TOKENIZER_FILES
        from llm_pipeline.data.chat import write_chat_template

        out = self.cfg.training.output_dir / "tokenizer"
        out.mkdir(parents=True, exist_ok=True)
        for f in TOKENIZER_FILES:
            if (tok / f).is_file():
                shutil.copyfile(tok / f, out / f)
        write_chat_template(out)
        return out

    def build_sources(self, info: DistInfo, model_cfg: ModelConfig) -> tuple[BatchSource, BatchSource | None]:
        from llm_pipeline.data.mixing import MixedBatchSource

        d, t = self.cfg.data, self.cfg.training
        domain, domain_val = self._sources("domain", d.domain, info)
        self._parts = [domain]
        if d.general is None:
            return domain, domain_val
        general, general_val = self._sources("general", d.general, info)
        self._parts.append(general)
        if d.general_validation and general_val is not None:
            self._extra_val = {"general": general_val}
        pad_id = getattr(domain, "pad_id", 0)
        mixed = MixedBatchSource(
            domain, general, domain_fraction=d.domain_fraction, seed=t.seed, rank=info.rank, pad_id=pad_id
        )
        return mixed, domain_val

    def extra_val_sources(self) -> dict[str, BatchSource]:
        return self._extra_val

    def check_data(self, train_source: BatchSource, model_cfg: ModelConfig) -> None:
        from llm_pipeline.train.pretrain import check_vocabulary

        for part in self._parts or [train_source]:
            check_vocabulary(part, model_cfg)
            self._check_tokenizer(part)
            examples = getattr(part, "examples", None)  # chat data: token ids from data.tokenizer_dir or the base's
            top = int(examples.tokens.max(initial=0)) if examples is not None else -1
            if top >= model_cfg.vocab_size:
                raise ValueError(
                    f"the chat data uses token id {top} but the base model has vocab_size {model_cfg.vocab_size}: "
                    f"the tokenizer ({self.tokenizer_dir()}) does not belong to model.init_from"
                )

    def _check_tokenizer(self, source: BatchSource) -> None:
        """Packed ids from another tokenizer than the base model's would train on garbage: warn."""
        from llm_pipeline.hashing import file_sha256

        manifest = getattr(getattr(source, "dataset", None), "manifest", None) or {}
        tok = self.tokenizer_dir()
        want = manifest.get("tokenizer_sha256")
        if want and tok is not None and (tok / "tokenizer.json").is_file():
            have = file_sha256(tok / "tokenizer.json")
            if have != want:
                log.warning(
                    "the packed data under %s was tokenized with another tokenizer.json than %s's "
                    "(sha256 %s... vs %s...): check that their ids agree",
                    source.dataset.root, tok, want[:12], have[:12],  # type: ignore[attr-defined]
                )  # fmt: skip

    def build_objective(self, model_cfg: ModelConfig) -> Objective:
        t = self.cfg.training
        chat = self.cfg.data.domain.kind == "chat"
        return CausalLMObjective(z_loss_weight=t.z_loss_weight, chunk_tokens=t.loss_chunk_tokens, trained_only=chat)

    def batching(self) -> Batching:
        if self.cfg.batch_unit != "tokens":
            return super().batching()
        t = self.cfg.training
        one_length = [CurriculumStage(step=0, seq_len=self.cfg.data.seq_len)]
        return TokenBatching(t.global_batch_tokens, t.micro_batch_size, one_length)

    def callbacks(self) -> list[Callback]:
        return [LoRAReport()]

    def tokenizer_dir(self) -> Path | None:
        return self._chat_template_dir or self.cfg.data.tokenizer_dir or super().tokenizer_dir()

    # ---- outputs -------------------------------------------------------------------------------

    @property
    def adapter_dir(self) -> Path:
        final = self.cfg.training.resolved_final_dir
        return final.with_name(final.name + ADAPTER_SUFFIX)

    def exports(self, model_cfg: ModelConfig) -> list[Export]:
        """The peft adapter (``<final_dir>_adapter``) and the merged model (``<final_dir>``)."""
        t, lora = self.cfg.training, self.cfg.lora
        final, adapter = t.resolved_final_dir, self.adapter_dir
        base = self.cfg.model.init_from
        dtype = torch.bfloat16 if t.precision == "bf16" else None
        meta = {"stage": self.kind, "base_model": str(base)}

        def write_adapter(state: dict[str, torch.Tensor]) -> Path:
            # Absolute: peft (AutoPeftModelForCausalLM) opens it from wherever the adapter is loaded.
            local = Path(base).resolve() if base is not None else None
            return save_adapter(state, model_cfg, lora, adapter, base_model_name_or_path=local, metadata=meta)

        def write_merged(state: dict[str, torch.Tensor]) -> Path:
            return save_merged(
                state, model_cfg, lora, final, dtype=dtype, tokenizer_dir=self.tokenizer_dir(),
                metadata={**meta, "adapter": str(adapter)},
            )  # fmt: skip

        return [Export("adapter", adapter, write_adapter), Export("model", final, write_merged)]

    @classmethod
    def pipeline_wiring(cls, ctx: WiringContext) -> dict[str, Any]:
        return {"data.packed_dir": str(ctx.packed_dir)} if ctx.packed_dir is not None else {}


# --------------------------------------------------------------------------------------------
# Exporting a training checkpoint (``llm-pipeline export CKPT OUT``)
# --------------------------------------------------------------------------------------------


def is_lora_checkpoint(ckpt: Path) -> bool:
    """A committed checkpoint of a LoRA run (its saved config has a ``lora`` section)."""
    return "lora" in _saved_config(ckpt)


def _saved_config(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); the checkpoint is damaged") from None
    return data if isinstance(data, dict) else {}


def load_lora_checkpoint(ckpt: Path) -> nn.Module:
    """The merged model (adapters folded into the base) of a LoRA training checkpoint.

    An adapter-only checkpoint holds no base weights: the base is rebuilt from the run's recorded
    ``model.init_from``, adapted with its recorded ``lora`` section, then the checkpoint's adapters are
    loaded on top. Refused with what is needed when that base is gone or is not the model it trained on.
    """
    from llm_pipeline.checkpoint.dcp import load_checkpoint
    from llm_pipeline.checkpoint.hf import load_pretrained, read_model_config
    from llm_pipeline.model.llama import build_model
    from llm_pipeline.train.lora import merged_model

    saved = _saved_config(ckpt)
    lora_cfg = LoRAConfig.model_validate(saved["lora"])
    meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    model_cfg = ModelConfig.model_validate(meta["model_config"])
    frozen_saved = meta.get("frozen_params_saved", True)
    base_dir = (saved.get("model") or {}).get("init_from")
    if frozen_saved:
        base = build_model(model_cfg, init=False)
    else:
        need = (
            f"{ckpt} holds only the LoRA adapters; its frozen base is the model the run started from "
            f"(model.init_from in its config.yaml)"
        )
        if not base_dir or not (Path(base_dir) / "config.json").is_file():
            raise ConfigError(
                f"{need}, {base_dir!r}, which is not a model directory any more. Put that base model back "
                "at that path to export this checkpoint (or export the run's <output_dir>_final instead)"
            )
        if read_model_config(base_dir) != model_cfg:
            raise ConfigError(f"{need}, {base_dir}, but that folder now holds a model of another architecture")
        base = load_pretrained(base_dir)
    model = apply_lora(base, lora_cfg)
    try:
        load_checkpoint(ckpt, model=model, optimizer=None, frozen_params=frozen_saved)
    except (RuntimeError, ValueError, OSError) as e:
        raise ConfigError(f"{ckpt}: could not load the adapter weights: {e}") from None
    return merged_model(model.state_dict(), model_cfg, lora_cfg)
