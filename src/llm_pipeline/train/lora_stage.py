"""The LoRA stage: peft adapters on a frozen base, domain + general data mixed at a set ratio.

A stage definition on the runner (:mod:`llm_pipeline.train.stage`), like pretraining: the model side
is :mod:`llm_pipeline.train.lora` (``transform = apply_lora``, ``fp8_filter = lora_fp8_filter``,
checkpoints without the frozen base), the data side is the data layer's own sources mixed row by row
by :class:`~llm_pipeline.data.mixing.WeightedMixture` (token shards by token, chat data by packed row):

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
from pydantic import Field, TypeAdapter, ValidationError, model_validator
from torch import nn

from llm_pipeline.config import ConfigError, ModelConfig, StrictModel
from llm_pipeline.data.config import SFTDataConfig
from llm_pipeline.data.mixture_config import MixtureFields, MixtureSource
from llm_pipeline.hardware import Check
from llm_pipeline.train.batching import Batching, BatchSource, TokenBatching
from llm_pipeline.train.config import CurriculumStage, ModelSource, StageConfig
from llm_pipeline.train.lora import (
    LoRAConfig,
    adapter_parameter_counts,
    apply_lora,
    lora_fp8_filter,
    save_adapter,
    save_merged,
)
from llm_pipeline.train.mixture import MixtureReport
from llm_pipeline.train.objectives import CausalLMObjective, Objective
from llm_pipeline.train.parallel import DistInfo, barrier
from llm_pipeline.train.stage import Export, Stage, WiringContext
from llm_pipeline.train.stage_inputs import InputContext, MemoryPlan, packed_data_checks, source_check
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


class LoRADataConfig(MixtureFields, StrictModel):
    """The data the adapters learn from: a weighted mixture of named sources (``sources``, each ``kind: tokens``
    or ``kind: chat`` with its reader keys), or the two-source form: domain data, general data (against
    forgetting) and the share of rows drawn from the domain. Both are the same mixture mechanism
    (:mod:`llm_pipeline.data.mixing`); the two-source form is sources ``domain`` (weight ``domain_fraction``,
    its held-out loss is ``loss``) and ``general`` (weight ``1 - domain_fraction``)."""

    domain: DataSource | None = Field(None, description="What the adapters learn: token shards or chat data.")
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
        True, description="Also evaluate the general data's held-out split (eval/general/loss, eval/general/ppl)."
    )
    tokenizer_dir: Path | None = Field(
        None, description="Tokenizer for chat data and the exports; default: the base model's own."
    )

    @model_validator(mode="after")
    def _check_sources(self) -> LoRADataConfig:
        if self.sources:
            old = sorted(k for k in ("domain", "general", "domain_fraction") if k in self.model_fields_set)
            if old:
                raise ValueError(
                    f"data.sources and data.{old[0]} are two forms of the same mixture: list the domain and general "
                    "data as data.sources entries ({name: domain, weight: 0.8, kind: tokens, ...}) and drop "
                    f"{', '.join('data.' + k for k in old)}"
                )
        elif self.domain is None:
            raise ValueError("set data.sources (a weighted mixture) or data.domain (and data.general)")
        if self.general is None and self.domain is not None and self.domain_fraction < 1:
            raise ValueError(
                f"domain_fraction {self.domain_fraction} draws general rows but data.general is not set; "
                "set data.general or domain_fraction: 1.0"
            )
        kinds = {name: src.kind for name, src in self.parts().items()}
        if len(set(kinds.values())) > 1:
            raise ValueError(
                f"data sources of different kinds {kinds}: mixed rows must be of one kind (all token shards or all "
                "chat data)"
            )
        budgeted = [s.name for s in self.sources if s.tokens is not None]
        if budgeted and set(kinds.values()) == {"chat"}:
            raise ValueError(
                f"data.sources {', '.join(map(repr, budgeted))}: a `tokens` budget is for token sources; chat data "
                "is mixed by packed rows, so give each chat source a `weight` (its share of rows) or `epochs`"
            )
        for name, src in self.parts().items():
            if isinstance(src, TokenData) and src.path is None and self.packed_dir is None:
                raise ValueError(f"data source {name!r} has no path and there is no data.packed_dir to fall back on")
        return self

    def parts(self) -> dict[str, TokenData | ChatData]:
        """Every source's reader by name (the two-source form: ``domain`` and ``general``)."""
        if self.sources:
            return self.source_configs()
        named = {"domain": self.domain, "general": self.general}
        return {n: s for n, s in named.items() if s is not None}

    def source_configs(self, renames: dict[str, str] | None = None) -> dict[str, Any]:  # type: ignore[override]
        if not self.sources:
            return self.parts()
        out: dict[str, Any] = {}
        for i, src in enumerate(self.sources):
            try:
                out[src.name] = _DATA_SOURCE.validate_python(src.reader)
            except ValidationError as e:
                problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'reader'}: {x['msg']}" for x in e.errors())
                raise ValueError(f"data.sources[{i}] ({src.name!r}): {problems}") from None
        return out

    def mixture_weights(self) -> dict[str, MixtureSource]:
        if self.sources:
            return super().mixture_weights()
        f = self.domain_fraction
        return {n: MixtureSource(name=n, weight=f if n == "domain" else 1 - f) for n in self.parts()}

    def eval_primary(self) -> str | None:
        return super().eval_primary() if self.sources else "domain"

    @property
    def kind(self) -> str:
        return next(iter(self.parts().values())).kind

    def token_path(self, src: TokenData) -> Path:
        path = src.path or self.packed_dir
        assert path is not None  # checked above
        return path


_DATA_SOURCE: TypeAdapter[TokenData | ChatData] = TypeAdapter(DataSource)


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
        return "tokens" if self.data.kind == "tokens" else "sequences"

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


class LoRAReport(MixtureReport):
    """The trainable parameters; for the two-source form, the realised domain share (all ranks) under the
    names LoRA has always logged.

    ``mix_domain_row_fraction`` / ``mix_domain_token_fraction`` are the shares of rows and of trained
    tokens drawn from the domain since the run began (the mixer's counters resume with its state); the
    logged line averages them over its steps. The final values and the trainable count go to
    ``TrainResult.stats`` (and the pipeline's summary), beside every source's ``mix/<source>/...``
    (:class:`~llm_pipeline.train.mixture.MixtureReport`, which the runner adds for every mixture).
    """

    def __init__(self) -> None:
        super().__init__()
        self.trainable: dict[str, float] = {}

    def on_train_start(self, trainer: Trainer) -> None:
        from llm_pipeline.train.lora import trainable_parameter_count

        super().on_train_start(trainer)
        if self.mixer is not None and set(self.mixer.names) != {"domain", "general"}:
            self.mixer = None  # a mixture of other names: MixtureReport alone reports it
        total = sum(p.numel() for p in trainer.model.parameters())  # global sizes, also under FSDP2
        n = trainable_parameter_count(trainer.model)  # apply_lora has logged it as the model was built
        self.trainable = {"trainable_params": float(n), "trainable_fraction": n / max(total, 1)}

    def mix(self, device: torch.device) -> dict[str, float]:
        """Realised counts and fractions over all ranks (collective: every rank calls it)."""
        if self.mixer is None:
            return {}
        g = self.global_counts(device)
        c = {f"{n}_{k}": g[n][src] for n in ("domain", "general") for k, src in (("rows", "rows"),
             ("tokens", "trained_tokens"))}  # fmt: skip
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
                mix["mix_domain_row_fraction"], mix["mix_domain_token_fraction"], self.mixer.shares["domain"],
            )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


class LoRAStage(Stage):
    kind = "lora"
    report_metrics = ("loss", "ppl", "general/ppl")
    config_class = LoRAStageConfig
    cfg: LoRAStageConfig
    save_frozen_params = False  # checkpoints: adapters + their optimizer state; the base is model.init_from
    resume_needs_same_start = True  # the frozen base is reloaded from model.init_from on resume

    def __init__(self, cfg: LoRAStageConfig) -> None:
        super().__init__(cfg)
        self._parts: list[BatchSource] = []  # the unmixed train sources (for the data checks)

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

        tok = self.base_tokenizer_dir()
        if tok is None:
            raise FileNotFoundError("chat data needs a tokenizer: the base model has none; set data.tokenizer_dir")
        rejects = src.sft.rejects_path or str(t.output_dir / f"lora_{name}_rejects.jsonl")
        train, val, _ = build_sft_sources(
            src.sft.model_copy(update={"rejects_path": rejects}), tok, micro_batch_size=t.micro_batch_size,
            rank=info.rank, world_size=info.world_size, seed=t.seed, output_dir=t.output_dir,
        )  # fmt: skip
        return train, (val if t.eval_steps else None)

    def base_tokenizer_dir(self) -> Path | None:
        """The tokenizer the data is encoded with: data.tokenizer_dir, or the base model's own."""
        return self.cfg.data.tokenizer_dir or super().tokenizer_dir()

    def _write_tokenizer_with_template(self, info: DistInfo) -> None:
        """Chat data rendered with our default template (the base's tokenizer has none): the exports carry the
        base's tokenizer plus that template, in ``<output_dir>/tokenizer`` (rank 0 writes it, all ranks wait)."""
        out, tok = self.tokenizer_dir(), self.base_tokenizer_dir()
        if out is None or tok is None or out == tok:
            return
        if info.is_main:
            import shutil

            from llm_pipeline.checkpoint.hf import TOKENIZER_FILES
            from llm_pipeline.data.chat import write_chat_template

            out.mkdir(parents=True, exist_ok=True)
            for f in TOKENIZER_FILES:
                if (tok / f).is_file():
                    shutil.copyfile(tok / f, out / f)
            write_chat_template(out)
        barrier()

    def build_sources(self, info: DistInfo, model_cfg: ModelConfig) -> tuple[BatchSource, BatchSource | None]:
        from llm_pipeline.data.mixing import build_mixture

        d, t = self.cfg.data, self.cfg.training
        self._write_tokenizer_with_template(info)
        parts = d.parts()
        if len(parts) == 1 and not d.sources:  # the domain alone: no mixture
            domain, domain_val = self._sources("domain", parts["domain"], info)
            self._parts = [domain]
            return domain, domain_val

        def build(name: str, src: TokenData | ChatData) -> tuple[BatchSource, BatchSource | None]:
            train, val = self._sources(name, src, info)
            keep_val = d.sources or name == "domain" or d.general_validation
            return train, (val if keep_val else None)

        # token shards mix tokens; chat data mixes packed rows (weights and epochs are of rows, as domain_fraction)
        unit = "tokens" if self.cfg.batch_unit == "tokens" else "rows"
        mixer, held_out = build_mixture(d, build, unit=unit, seed=t.seed, rank=info.rank)
        self._parts = list(mixer.sources.values())
        return mixer, held_out

    def check_data(self, train_source: BatchSource, model_cfg: ModelConfig) -> None:
        from llm_pipeline.train.pretrain import check_vocabulary

        for part in self._parts or [train_source]:
            check_vocabulary(part, model_cfg)
            dataset = getattr(part, "dataset", None)  # token shards: the tokenizer they were packed with
            if dataset is not None and (problem := tokenizer_mismatch(dataset.root, self.base_tokenizer_dir())):
                raise ValueError(problem)
            examples = getattr(part, "examples", None)  # chat data: token ids from data.tokenizer_dir or the base's
            top = int(examples.tokens.max(initial=0)) if examples is not None else -1
            if top >= model_cfg.vocab_size:
                raise ValueError(
                    f"the chat data uses token id {top} but the base model has vocab_size {model_cfg.vocab_size}: "
                    f"the tokenizer ({self.base_tokenizer_dir()}) does not belong to model.init_from"
                )
        self._warn_rounded_base()

    def _warn_rounded_base(self) -> None:
        """A bf16 base from fp32 weights: the adapters learn on rounded weights; say what that costs."""
        have = start_model_dtype(self.cfg.model.init_from)
        if self.cfg.lora.base_dtype == "bfloat16" and have == "float32":
            log.warning(
                "lora.base_dtype is bfloat16 but model.init_from %s holds float32 weights: the adapters train on a "
                "base rounded to bf16, so peft's adapter on the fp32 base gives logits about 1e-2 away from the "
                "merged export (the merged model is exact). Set lora.base_dtype: float32 (twice the base's memory), "
                "or start from a bf16 export of the base",
                self.cfg.model.init_from,
            )

    def build_objective(self, model_cfg: ModelConfig) -> Objective:
        t = self.cfg.training
        chat = self.cfg.data.kind == "chat"
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
        """The exports' tokenizer: the base's, or (chat data, the base's tokenizer has no chat template) a copy
        with the default template the data was rendered with, at ``<output_dir>/tokenizer``."""
        from llm_pipeline.data.chat import read_chat_template

        tok = self.base_tokenizer_dir()
        if self.cfg.data.kind == "chat" and tok is not None and read_chat_template(tok) is None:
            return self.written_tokenizer_dirs(Path(self.cfg.training.output_dir))[0]
        return tok

    @classmethod
    def written_tokenizer_dirs(cls, output_dir: Path) -> tuple[Path, ...]:
        return (output_dir / "tokenizer",)

    # ---- outputs -------------------------------------------------------------------------------

    @property
    def adapter_dir(self) -> Path:
        final = self.cfg.training.resolved_final_dir
        return final.with_name(final.name + ADAPTER_SUFFIX)

    def export_paths(self) -> dict[str, Path]:
        return {"adapter": self.adapter_dir, "model": self.cfg.training.resolved_final_dir}

    def exports(self, model_cfg: ModelConfig) -> list[Export]:
        """The peft adapter (``<final_dir>_adapter``) and the merged model (``<final_dir>``)."""
        t, lora = self.cfg.training, self.cfg.lora
        final, adapter = t.resolved_final_dir, self.adapter_dir
        base = self.cfg.model.init_from
        dtype = torch.bfloat16 if t.precision == "bf16" else None
        # the base's dtype the adapters were trained on, and the start model's own (they differ: see the warning)
        meta = {"stage": self.kind, "base_model": str(base), "base_dtype": lora.base_dtype,
                "start_model_dtype": start_model_dtype(base)}  # fmt: skip

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

    # ---- pre-flight ----------------------------------------------------------------------------

    def input_checks(self, ctx: InputContext) -> list[Check]:
        """The base model, the domain and general data (packed shards with their splits, or chat records), and
        that token shards were packed with the base's tokenizer."""
        d = self.cfg.data
        out = super().input_checks(ctx)
        base_tok = self.base_tokenizer_dir() if ctx.writer(self.cfg.model.init_from) is None else None
        for role, src in d.parts().items():
            what = f"data: {ctx.name} ({role})"
            if isinstance(src, ChatData):
                out.append(source_check(what, src.sft.kind, [*src.sft.paths, *src.sft.val_paths], src.sft.name))
                continue
            if src is None:
                continue
            path = d.token_path(src)
            splits = [src.train_split] + ([src.val_split] if src.val_split and self.cfg.training.eval_steps else [])
            checks = packed_data_checks(ctx, path, splits, what, self._packing_fix(path, role), ctx.model)
            out += checks
            usable = checks[-1].status == "ok" and ctx.available(path, "manifest.json")
            if usable and (problem := tokenizer_mismatch(path, base_tok)) is not None:
                out.append(Check(f"tokenizer: {ctx.name} ({role})", "BLOCKER", problem))
        if d.tokenizer_dir is not None:
            out.append(ctx.tokenizer(d.tokenizer_dir))
        return out

    def _packing_fix(self, path: Path, role: str) -> str:
        where = f"output_dir: {path.parent}" if path.name == "packed" else f"packed shards at {path}"
        return (
            f"nothing in this run writes it: pack the {role} corpus with the base model's tokenizer, "
            f"`llm-pipeline data prepare --config DATA.yaml` with tokenizer.path: <the data step's tokenizer> and "
            f"{where} (configs/data_domain.yaml does this for configs/lora_finetune.yaml), or point "
            f"data.{role}.path at packed shards"
        )

    def memory_plan(self, model_cfg: ModelConfig) -> MemoryPlan:
        """Rows of the stage's own length (``data.seq_len``, or the chat data's max_seq_len); AdamW state only
        for the adapters; the frozen base in ``lora.base_dtype``."""
        d = self.cfg.data
        first = next(iter(d.parts().values()))
        seq = d.seq_len if isinstance(first, TokenData) else max(s.sft.max_seq_len for s in d.parts().values())
        params, tensors = adapter_parameter_counts(model_cfg, self.cfg.lora)
        return MemoryPlan(
            rows=self.cfg.training.micro_batch_size, seq_len=seq, trainable_params=params, trainable_tensors=tensors,
            frozen_bytes=2 if self.cfg.lora.base_dtype == "bfloat16" else 4,
        )  # fmt: skip

    def export_bytes(self, model_cfg: ModelConfig) -> int:
        """The merged model plus the fp32 adapter."""
        return super().export_bytes(model_cfg) + 4 * adapter_parameter_counts(model_cfg, self.cfg.lora)[0]

    # ---- a training checkpoint back to a model -------------------------------------------------

    @classmethod
    def load_for_export(cls, ckpt: Path) -> tuple[nn.Module, str]:
        """The merged model (adapters folded into the base) of a LoRA training checkpoint.

        An adapter-only checkpoint holds no base weights: the base is rebuilt from the run's recorded
        ``model.init_from``, adapted with its recorded ``lora`` section, then the checkpoint's adapters are
        loaded on top. Refused with what is needed when that base is gone, is not the model it trained on,
        or its files changed since (the recorded ``model.init_digest``).
        """
        from llm_pipeline.checkpoint.dcp import load_checkpoint
        from llm_pipeline.checkpoint.hf import load_pretrained, read_model_config
        from llm_pipeline.model.llama import build_model
        from llm_pipeline.train.lora import merged_model
        from llm_pipeline.train.model_setup import start_model_digest
        from llm_pipeline.train.stage import saved_run_config

        saved = saved_run_config(ckpt)
        lora_cfg = LoRAConfig.model_validate(saved["lora"])
        meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
        model_cfg = ModelConfig.model_validate(meta["model_config"])
        frozen_saved = meta.get("frozen_params_saved", True)
        source = saved.get("model") or {}
        base_dir = source.get("init_from")
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
            recorded = source.get("init_digest")
            if recorded and start_model_digest(ModelSource(init_from=base_dir), 0) != recorded:
                raise ConfigError(
                    f"{need}, {base_dir}, but its weight files changed since the adapters were trained (content "
                    "digest differs): put the original base back there, or export the run's <output_dir>_final"
                )
            base = load_pretrained(base_dir)
        model = apply_lora(base, lora_cfg)
        try:
            load_checkpoint(ckpt, model=model, optimizer=None, frozen_params=frozen_saved)
        except (RuntimeError, ValueError, OSError) as e:
            raise ConfigError(f"{ckpt}: could not load the adapter weights: {e}") from None
        return merged_model(model.state_dict(), model_cfg, lora_cfg), "LoRA: adapters merged into the base"


def start_model_dtype(init_from: Path | None) -> str | None:
    """The dtype of the start model's weights as stored (``float32``, ``bfloat16``; None: unknown)."""
    if init_from is None:
        return None
    files = sorted(Path(init_from).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(files[0]), framework="pt") as f:
            names = list(f.keys())
            if not names:
                return None
            return str(f.get_slice(names[0]).get_dtype()).replace("F32", "float32").replace("BF16", "bfloat16")
    except (OSError, ValueError, RuntimeError):
        return None


def tokenizer_mismatch(packed: Path, base_tokenizer: Path | None) -> str | None:
    """Why token shards packed under ``packed`` do not fit the base model's tokenizer (None: they do, or it
    cannot be told). Same tokenizer file: fine. Otherwise the data's tokenizer (the data step's, beside the
    shards) must give every token the id the base's does; the base may have more (SFT's chat tokens)."""
    from tokenizers import Tokenizer

    from llm_pipeline.hashing import file_sha256

    if base_tokenizer is None or not (Path(base_tokenizer) / "tokenizer.json").is_file():
        return None
    try:
        manifest = json.loads((Path(packed) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    want = manifest.get("tokenizer_sha256")
    base_file = Path(base_tokenizer) / "tokenizer.json"
    if not want or file_sha256(base_file) == want:
        return None
    data_file = Path(packed).parent / "tokenizer" / "tokenizer.json"
    if not data_file.is_file() or file_sha256(data_file) != want:
        log.warning(
            "the packed data under %s was tokenized with another tokenizer.json than %s (sha256 %s...), and that "
            "tokenizer is not beside the shards to compare: check that their ids agree", packed, base_file, want[:12],
        )  # fmt: skip
        return None
    data_vocab = Tokenizer.from_file(str(data_file)).get_vocab(with_added_tokens=True)
    base_vocab = Tokenizer.from_file(str(base_file)).get_vocab(with_added_tokens=True)
    differ = [t for t, i in data_vocab.items() if base_vocab.get(t) != i]
    if not differ:
        return None  # the base's tokenizer extends the data's (e.g. chat tokens added by SFT)
    return (
        f"the packed data under {packed} was tokenized with {data_file}, whose ids differ from the base model's "
        f"tokenizer {base_file} for {len(differ)} of {len(data_vocab)} tokens (e.g. {differ[0]!r}): training would "
        "learn from mismatched ids. Pack the data with the base model's tokenizer (data prepare with "
        "tokenizer.path: the base model's folder)"
    )
