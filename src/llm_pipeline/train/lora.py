"""LoRA adapters for the fine-tuning stage: peft layers in our model, a frozen base, PEFT-format exports.

The adapters are peft's own (``peft.inject_adapter_in_model`` on our plain ``LlamaForCausalLM``), so the
forward, rsLoRA/DoRA scaling, merge and file layout are exactly what a peft user gets. What the runner
calls, in order:

1. :func:`apply_lora` on every model it builds, before ``parallelize``: the meta-device model that
   FSDP2 shards, and (on rank 0) the materialised model whose full state dict is broadcast into the
   shards. The adapter init is seeded, so both carry the same adapters.
2. ``parallelize`` with :func:`lora_fp8_filter` as the stage's float8 filter, so adapter matrices
   stay out of float8 (a rank that is a multiple of 16 would otherwise qualify).
3. Checkpoints without the frozen base (the stage's ``save_frozen_params = False``): adapters and
   their optimizer state only; on resume the frozen base comes from the base model again.
4. After gathering the full state dict (``checkpoint.dcp.full_model_state_dict``), on rank 0:
   :func:`save_adapter` (``adapter/``) and :func:`save_merged` (an HF model with the adapters folded in).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from safetensors.torch import save_file
from torch import nn

from llm_pipeline.checkpoint.fsio import write_text_synced
from llm_pipeline.config import ModelConfig, StrictModel
from llm_pipeline.model.llama import LlamaForCausalLM, build_model

if TYPE_CHECKING:
    import peft

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TargetModule = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_EXPORT_KIND = "lora_adapter"  # llm_pipeline.json "kind" of an adapter folder (export safety)
# Module names peft adds under an adapted layer: everything below one of them is adapter state.
ADAPTER_MODULE_NAMES = frozenset(
    {"lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B", "lora_dropout"}
)
# PeftModel.save_pretrained writes keys as seen from PeftModel (-> LoraModel -> the model itself).
PEFT_KEY_PREFIX = "base_model.model."
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def import_peft() -> Any:
    """``peft``, imported with the warnings its optional torchao import logs on machines without CUDA
    kernels or triton (and torch's deprecation note on torchao's enums) kept off the console."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        import peft
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    return peft


class LoRAConfig(StrictModel):
    """Adapter hyper-parameters (the ``lora`` section of ``configs/lora_finetune.yaml``)."""

    r: int = Field(64, gt=0, description="Rank: each target weight W [out, in] gains B [out, r] @ A [r, in].")
    alpha: float = Field(
        128.0,
        gt=0,
        description="Scale numerator: the update is (alpha / r)·B@A, or (alpha / sqrt(r))·B@A with rsLoRA. "
        "When omitted it is 2·r (128 at the default r=64), so changing only r keeps the scale at 2.",
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input (the base path is untouched)."
    )
    target_modules: list[TargetModule] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        description="Projections that get adapters; default all seven (attention q/k/v/o and MLP gate/up/down).",
    )
    use_rslora: bool = Field(
        False, description="Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)."
    )
    use_dora: bool = Field(
        False, description="DoRA: a trainable per-output magnitude on top of the LoRA direction (Liu et al. 2024)."
    )
    base_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Storage dtype of the frozen base; bfloat16 halves its memory and needs bf16 training "
        "precision (autocast or the FSDP2 bf16 policy). Adapters are always float32.",
    )
    init_seed: int = Field(0, description="Seed of the adapter init: the same adapters on every run and rank.")

    @model_validator(mode="before")
    @classmethod
    def _alpha_defaults_to_twice_r(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "alpha" not in data and isinstance(data.get("r", 64), int):
            return {**data, "alpha": 2 * data.get("r", 64)}
        return data

    @field_validator("target_modules")
    @classmethod
    def _unique_targets(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"target_modules lists a module twice: {value}")
        return value

    @property
    def scaling(self) -> float:
        """The factor on B@A, as peft computes it."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_peft(self, base_model_name_or_path: str | None = None) -> peft.LoraConfig:
        """The equivalent ``peft.LoraConfig`` (what ``adapter_config.json`` holds)."""
        peft = import_peft()
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=int(self.alpha) if float(self.alpha).is_integer() else self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            bias="none",
            init_lora_weights=True,  # A: kaiming-uniform, B: zeros, so the adapted model starts as the base
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_name_or_path,
        )


# --------------------------------------------------------------------------------------------
# The model transform
# --------------------------------------------------------------------------------------------


def is_adapter_name(name: str) -> bool:
    """True for a parameter or module name that belongs to a peft adapter (not to the base model)."""
    return not ADAPTER_MODULE_NAMES.isdisjoint(name.split("."))


def _inject(model: LlamaForCausalLM, cfg: LoRAConfig) -> LlamaForCausalLM:
    peft = import_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("the model already has peft adapters; apply_lora must run once, on the plain model")
    base_dtype = _DTYPES[cfg.base_dtype]
    base = list(model.parameters())  # unique tensors: a tied head is handled once
    with torch.no_grad():
        for p in base:
            p.requires_grad_(False)
            # peft creates adapters in the base layer's dtype and DoRA takes its magnitude from the base
            # weight, so inject on an fp32 copy of the base *as it will be stored*: fp32 adapters, and a
            # DoRA magnitude that is the exact norm of the stored weights (the model starts as the base).
            p.data = p.data.to(base_dtype).float()
    # peft draws the adapter init on the CPU generator before moving it to the base's device, so a
    # seeded, forked CPU RNG gives the same adapters on CPU, GPU and meta-then-broadcast, and leaves
    # the caller's RNG stream (data order, dropout) untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        peft.inject_adapter_in_model(cfg.to_peft(), model)
    with torch.no_grad():
        for p in base:
            p.data = p.data.to(base_dtype)
    for name, p in model.named_parameters():
        adapter = is_adapter_name(name)
        p.requires_grad_(adapter)
        if adapter and p.dtype != torch.float32:
            raise AssertionError(f"{name}: adapter parameter in {p.dtype}, expected float32")
    return model


def apply_lora(model: LlamaForCausalLM, cfg: LoRAConfig) -> LlamaForCausalLM:
    """Inject peft LoRA adapters into the target projections and freeze everything else (in place).

    Works on a meta-device model (structure only, for FSDP2) and on a materialised one (on any device).
    The base is stored in ``cfg.base_dtype``, adapters in fp32. Logs the trainable parameter count.
    """
    _inject(model, cfg)
    log.info("LoRA r=%d alpha=%g%s%s: %s", cfg.r, cfg.alpha, " rsLoRA" if cfg.use_rslora else "",
             " DoRA" if cfg.use_dora else "", trainable_summary(model))  # fmt: skip
    return model


def adapter_parameter_counts(model_cfg: ModelConfig, lora_cfg: LoRAConfig) -> tuple[int, int]:
    """(adapter parameters, adapter tensors) of ``lora_cfg`` on this architecture, counted on a meta model."""
    return _adapter_counts(model_cfg.model_dump_json(), lora_cfg.model_dump_json())


@functools.lru_cache(maxsize=16)
def _adapter_counts(model_json: str, lora_json: str) -> tuple[int, int]:
    model = build_model(ModelConfig.model_validate_json(model_json), device="meta", init=False)
    trainable = [p for p in _inject(model, LoRAConfig.model_validate_json(lora_json)).parameters() if p.requires_grad]
    return sum(p.numel() for p in trainable), len(trainable)


def trainable_parameter_count(model: nn.Module) -> int:
    """Parameters that receive gradients (global sizes under FSDP2; a tied weight counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_summary(model: nn.Module) -> str:
    """``trainable 167,772,160 of 7,559,450,624 parameters (2.219%)``: the line every LoRA run logs."""
    trainable = trainable_parameter_count(model)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)"


def lora_fp8_filter(module: nn.Module, fqn: str) -> bool:
    """float8 module filter: False for anything under a peft adapter module, True otherwise (AND it in).

    The frozen ``base_layer`` Linear may become float8; the small adapter matrices must not (their
    rank dimension gains nothing from float8 GEMMs and their updates need full precision). Decided by
    name (``...q_proj.lora_A.default``), so it costs nothing and needs no peft import in a run without
    adapters; torchao only asks about ``nn.Linear`` modules, which peft's wrapper layers are not.
    """
    return not is_adapter_name(fqn)


# --------------------------------------------------------------------------------------------
# Exports, from a full (gathered, CPU) state dict with peft's module names
# --------------------------------------------------------------------------------------------


def _skeleton(model_cfg: ModelConfig, lora_cfg: LoRAConfig) -> LlamaForCausalLM:
    """The adapted model on the meta device, in fp32: names, shapes and peft bookkeeping, no memory."""
    return _inject(build_model(model_cfg, device="meta"), lora_cfg.model_copy(update={"base_dtype": "float32"}))


def _check_keys(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{what}: state dict does not match the adapted model: missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )


def adapter_tensors(
    state: Mapping[str, torch.Tensor], model_cfg: ModelConfig, lora_cfg: LoRAConfig
) -> dict[str, torch.Tensor]:
    """The adapter tensors of a full state dict, under the keys of peft's ``adapter_model.safetensors``."""
    get_peft_model_state_dict = import_peft().get_peft_model_state_dict

    skeleton = _skeleton(model_cfg, lora_cfg)
    expected = {k: v for k, v in skeleton.state_dict().items() if is_adapter_name(k)}
    _check_keys({k: v for k, v in state.items() if is_adapter_name(k)}, expected, "adapter export")
    picked = get_peft_model_state_dict(skeleton, state_dict={k: state[k] for k in expected})
    return {
        PEFT_KEY_PREFIX + k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in picked.items()
    }


def save_adapter(
    state: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    lora_cfg: LoRAConfig,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | os.PathLike[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) safely.

    ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)`` loads it
    as is; ``base_model_name_or_path`` (the HF directory the run started from) is recorded for it.
    Written through the exports' safety (``checkpoint.hf.write_export``, kind ``lora_adapter``): a
    previous adapter export is replaced, any other non-empty folder refused unless ``overwrite``.
    """
    from llm_pipeline.checkpoint.hf import write_export

    tensors = adapter_tensors(state, model_cfg, lora_cfg)
    base = None if base_model_name_or_path is None else str(base_model_name_or_path)
    config = lora_cfg.to_peft(base).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_text_synced(tmp / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")

    meta = {"lora": lora_cfg.model_dump(mode="json"), "model_config": model_cfg.model_dump(mode="json"),
            **(metadata or {})}  # fmt: skip
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return write_export(out_dir, write, kind=ADAPTER_EXPORT_KIND, metadata=meta, overwrite=overwrite,
                        needed_bytes=nbytes)  # fmt: skip


def merged_model(state: Mapping[str, torch.Tensor], model_cfg: ModelConfig, lora_cfg: LoRAConfig) -> LlamaForCausalLM:
    """A plain fp32 ``LlamaForCausalLM`` with the adapters folded into the base weights (peft's merge, DoRA too)."""
    import_peft()
    from peft.tuners.lora import LoraLayer

    model = _skeleton(model_cfg, lora_cfg)
    full = {k: v.detach().to(device="cpu", dtype=torch.float32) for k, v in state.items()}
    if model_cfg.tie_word_embeddings and "lm_head.weight" not in full:
        full["lm_head.weight"] = full["model.embed_tokens.weight"]
    _check_keys(full, model.state_dict(), "merged export")
    model.load_state_dict(full, assign=True)
    model.tie_weights()
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                # The base weight aliases the caller's tensor (load_state_dict(assign=True)) and peft >= 0.22
                # merges in place: merge into a copy, one layer at a time, so ``state`` is never changed.
                weight = module.get_base_layer().weight
                weight.data = weight.data.clone()
                module.merge(safe_merge=True)  # raises on a non-finite merged weight
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)  # a plain model again, as load_pretrained would return it
    return model


def save_merged(
    state: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    lora_cfg: LoRAConfig,
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the merged model as an HF LLaMA directory through ``checkpoint.hf.save_pretrained``."""
    from llm_pipeline.checkpoint.hf import save_pretrained

    lora_meta = {"lora": lora_cfg.model_dump(mode="json"), **(metadata or {})}
    model = merged_model(state, model_cfg, lora_cfg)
    return save_pretrained(model, out_dir, dtype=dtype, tokenizer_dir=tokenizer_dir, metadata=lora_meta)
