"""AdamW with decay groups and the learning-rate schedule (warmup, then cosine / linear / WSD / constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from llm_pipeline.train.config import TrainingConfig
from llm_pipeline.train.errors import TrainingError


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
