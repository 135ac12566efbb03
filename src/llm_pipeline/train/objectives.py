"""Objectives: what a stage optimises, separate from how the loop runs.

A stage is a config plus an :class:`Objective`. The objective says how many loss *units* a batch
holds (label tokens for language modelling, pairs for preference losses) and returns the *sum* of
its loss over them; the trainer divides by the units of the whole global batch (all
micro-batches, all ranks). That makes gradient accumulation, data parallelism and the OOM
fallback (smaller micro-batches) exact: the gradient does not depend on how a step is split.

A new objective (SFT, DPO, ...) is a small subclass; it never copies the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]
IGNORE_INDEX = -100


@dataclass
class ObjectiveOutput:
    """``loss_sum`` is differentiated; ``metric_sums`` are detached sums, averaged over units by the trainer."""

    loss_sum: torch.Tensor
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(ABC):
    """Loss and batch format of one training stage."""

    #: Metric whose exp() is reported as perplexity (None: the objective has no perplexity).
    perplexity_of: str | None = None

    @abstractmethod
    def count(self, batch: Batch) -> int:
        """Loss units in ``batch`` (computed before the forward, so normalisers are known up front)."""

    @abstractmethod
    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        """Forward ``batch`` through ``model``; return the summed loss and metric sums."""


class CausalLMObjective(Objective):
    """Next-token cross-entropy over packed rows, with optional z-loss.

    Batch: ``input_ids`` [B, T], ``labels`` [B, T] (already shifted targets, -100 = no loss) and
    optionally ``document_ids`` [B, T] for per-document attention. The z-loss
    (``weight · logsumexp(logits)²``, PaLM) keeps the softmax normaliser near 0 for bf16 stability.
    """

    perplexity_of = "ce"

    def __init__(self, z_loss_weight: float = 0.0) -> None:
        self.z_loss_weight = z_loss_weight

    def count(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        logits = model(batch["input_ids"], document_ids=batch.get("document_ids"))  # [B, T, V]
        logits = logits.float().flatten(0, 1)  # [B*T, V]
        labels = batch["labels"].flatten()
        ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        metrics = {"ce": ce.detach()}
        loss = ce
        if self.z_loss_weight > 0:
            valid = labels != IGNORE_INDEX
            z = torch.logsumexp(logits, dim=-1)[valid]
            z_sum = z.pow(2).sum()
            loss = loss + self.z_loss_weight * z_sum
            metrics["z_loss"] = z_sum.detach()
        return ObjectiveOutput(loss_sum=loss, metric_sums=metrics)
