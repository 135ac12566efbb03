"""What a resumed run may change, and making the changes real.

A checkpoint restores the optimizer's and scheduler's hyper-parameters as they were saved. Left
alone, a resume with ``--set training.learning_rate=1e-3`` would train with the old rate while the
new checkpoint's ``config.yaml`` claimed the new one. So on resume:

- keys of the sections a stage declares mutable (``training``, ``parallel``, pretraining's
  ``curriculum``) are *applied*: the schedule is recomputed from the new config at the restored
  step, and AdamW's betas, epsilon and weight decay are set from it;
- every other key (the model, the data, stage-specific sections such as DPO's loss or LoRA's
  adapters) and ``training.seed`` must equal the checkpoint's, or the resume is refused naming
  each differing key.

``config.yaml`` in every checkpoint is therefore always what was actually used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel

from llm_pipeline.config import config_to_dict
from llm_pipeline.train.config import TrainingConfig
from llm_pipeline.train.errors import TrainingError

log = logging.getLogger(__name__)

_DEFAULT_MUTABLE = ("training", "parallel")
_DEFAULT_FIXED = ("training.seed",)
# Where this run writes (and logs) and whether it resumes: never a reason to refuse (an explicit checkpoint
# may come from another folder), nor a change to report.
_ALWAYS_MUTABLE = (
    "training.resume_from_checkpoint",
    "training.output_dir",
    "training.final_dir",
    "training.logging_dir",
    "training.trackers",  # where the metrics also go: neither the weights nor the data order depend on it
    "training.tracking",
)
#: Recorded by the runner, not set by users: compared only when both sides have one (a checkpoint saved before it
#: was recorded, or a config the runner has not yet completed, has nothing to compare).
_RECORDED = ("model.init_digest",)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _known(value: Any) -> Any:
    return None if value == "<unset>" else value


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_resume_config(checkpoint: Path, run_config: BaseModel | None) -> list[str]:
    """Compare this run's config with the one saved in ``checkpoint``.

    Returns the changes that will be applied (one readable line each); raises ``TrainingError``
    naming every key that a resume cannot change.
    """
    saved_file = Path(checkpoint) / "config.yaml"
    if run_config is None or not saved_file.is_file():
        return []
    try:
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RuntimeError(f"{saved_file}: unreadable ({e})") from None
    mutable = getattr(type(run_config), "mutable_on_resume", _DEFAULT_MUTABLE)
    fixed = getattr(type(run_config), "fixed_on_resume", _DEFAULT_FIXED)
    old, new = _flatten(saved), _flatten(config_to_dict(run_config))
    applied, refused = [], []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "<unset>"), new.get(key, "<unset>")
        if before == after or _matches(key, _ALWAYS_MUTABLE):
            continue
        if key in _RECORDED and None in (_known(before), _known(after)):
            continue
        line = f"{key}: {before!r} -> {after!r}"
        if key in _RECORDED:
            line += " (the start model's files changed since this checkpoint was written)"
        if _matches(key, mutable) and not _matches(key, fixed):
            applied.append(line)
        else:
            refused.append(line)
    if refused:
        raise TrainingError(
            f"cannot resume from {checkpoint}: these settings differ from the checkpoint's and a resume cannot "
            "change them (start a new run in a fresh output_dir, or restore the old values):\n  " + "\n  ".join(refused)
        )
    return applied


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainingConfig, step: int
) -> None:
    """Set the optimizer's hyper-parameters from ``cfg`` after a checkpoint restored the saved ones.

    The scheduler's lambda reads ``cfg``, so with the peak rate reset here the rate at ``step`` is the
    new schedule's: warmup, decay shape and max_steps changes all take effect from the restored step.
    """
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = cfg.learning_rate
        group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        group["eps"] = cfg.adam_eps
        decays = group.get("decay", i == 0)  # optim.build_optimizer: the decay group comes first
        group["weight_decay"] = cfg.weight_decay if decays else 0.0
    scheduler.base_lrs = [cfg.learning_rate for _ in optimizer.param_groups]
    factors = [fn(step) for fn in scheduler.lr_lambdas]
    for group, factor in zip(optimizer.param_groups, factors, strict=True):
        group["lr"] = cfg.learning_rate * factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
