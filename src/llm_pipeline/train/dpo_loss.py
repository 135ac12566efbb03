"""Preference losses of the DPO stage, and its objective (policy vs reference log-probs per pair).

Notation, per pair: ``π_w, π_l`` the policy's summed log-probs of the chosen (w) and rejected (l)
completion tokens, ``ρ_w, ρ_l`` the frozen reference model's, ``n_w, n_l`` the completions' token
counts, ``β`` the temperature and ``ε`` the label smoothing. The log-ratio margin is

    h = (π_w - ρ_w) - (π_l - ρ_l)                      (sequence sums)
    h̄ = (π_w - ρ_w) / n_w - (π_l - ρ_l) / n_l          (per-token means: ``ipo`` and ``dpo_norm``)

and the losses (TRL's ``loss_type`` names, same formulas):

- ``sigmoid``  (DPO, Rafailov et al. 2023, eq. 7; with ε > 0 conservative DPO / cDPO, Mitchell 2023):
  ``(1 - ε) · -log σ(β h) + ε · -log σ(-β h)``
- ``robust``   (robust DPO, Chowdhury et al. 2024, eq. 12): an unbiased loss under label noise ε < 1/2,
  ``[(1 - ε) · -log σ(β h) - ε · -log σ(-β h)] / (1 - 2ε)``
- ``hinge``    (SLiC / RSO, Zhao et al. 2023, Liu et al. 2024): ``max(0, 1 - β h)``
- ``ipo``      (IPO, Azar et al. 2023, eq. 17, with TRL's length-normalised log-probs): ``(h̄ - 1 / (2β))²``
- ``dpo_norm`` (length-normalised DPO, Tulu 3 / open-instruct): the ``sigmoid`` loss of ``h̄``
- ``sft_weight`` adds ``-π_w / n_w`` (the chosen completion's mean token NLL; TRL's ``rpo_alpha``) times
  the weight.

Several loss types combine as ``Σ_k weight_k · loss_k``. Every term is a per-pair value; the objective
returns their sum over a micro-batch and one unit per pair, so the trainer's mean over the global batch
does not depend on micro-batching or ranks (TRL averages its NLL over tokens instead).

The implicit rewards logged (``rewards/chosen`` = β (π_w - ρ_w), ``rewards/rejected`` = β (π_l - ρ_l),
``rewards/margins``, ``rewards/accuracies`` = share of pairs with chosen reward > rejected reward, ties
counting as wrong) and ``logps/chosen`` / ``logps/rejected`` (π_w, π_l) use sequence sums for every loss type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from llm_pipeline.model.flops import FlopModel
from llm_pipeline.train.objectives import (
    DEFAULT_CHUNK_TOKENS,
    IGNORE_INDEX,
    Batch,
    BatchCost,
    Objective,
    ObjectiveOutput,
    token_logprobs,
)

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "dpo_norm"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust", "dpo_norm")
#: Losses that read per-token mean log-ratios instead of sequence sums.
LENGTH_NORMALISED = ("ipo", "dpo_norm")
#: Batch keys of the cached reference log-probs ([B], summed over each completion).
REF_CHOSEN, REF_REJECTED = "ref_chosen_logps", "ref_rejected_logps"


def preference_loss(loss_type: str, margin: torch.Tensor, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss of one type from its log-ratio margin (``h``, or ``h̄`` for the length-normalised ones)."""
    eps = label_smoothing
    if loss_type in ("sigmoid", "dpo_norm"):
        return -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * margin) + eps * F.logsigmoid(-beta * margin)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * margin)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")


def sequence_logps(model: nn.Module, batch: Batch, *, chunk_tokens: int) -> tuple[torch.Tensor, ...]:
    """(chosen sums, rejected sums, chosen token counts, rejected token counts), each [B], in fp32.

    Chosen and rejected rows go through one forward of 2B rows (right-padded; causal attention keeps
    real tokens off the padding), the LM head only on completion tokens, in chunks.
    """
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logp = model(ids, head_fn=lambda h, head: token_logprobs(head, h, labels, chunk_tokens=chunk_tokens))
    sums = logp.sum(dim=1)
    counts = (labels != IGNORE_INDEX).sum(dim=1).to(sums.dtype)
    b = batch["chosen_input_ids"].shape[0]
    return sums[:b], sums[b:], counts[:b], counts[b:]


class DPOObjective(Objective):
    """The DPO family of losses over preference pairs; one unit per pair (filler rows, ``pair_ids`` -1, none).

    The reference log-probs come with the batch (``ref_chosen_logps`` / ``ref_rejected_logps``, computed
    once before training: :mod:`llm_pipeline.train.dpo_reference`) or, with ``reference_model``, from a
    frozen copy of the start model run without gradients on every batch.
    """

    console_metrics = (("rewards/accuracies", "reward acc {:.3f}"), ("rewards/margins", "margin {:.4f}"))

    def __init__(
        self,
        loss_types: Sequence[str] = ("sigmoid",),
        loss_weights: Sequence[float] | None = None,
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        reference_model: nn.Module | None = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        unknown = [t for t in loss_types if t not in LOSS_TYPES]
        if unknown or not loss_types:
            raise ValueError(f"DPO loss types {list(loss_types)}: choose one or more of {', '.join(LOSS_TYPES)}")
        weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
        if len(weights) != len(loss_types):
            raise ValueError(f"{len(weights)} loss weights for {len(loss_types)} loss types")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.losses = list(zip(loss_types, weights, strict=True))
        self.beta, self.label_smoothing, self.sft_weight = beta, label_smoothing, sft_weight
        self.reference_model = reference_model
        self.chunk_tokens = chunk_tokens

    def count(self, batch: Batch) -> int:
        return int((batch["pair_ids"] >= 0).sum())

    def _reference(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_model is not None:
            with torch.no_grad():
                chosen, rejected, _, _ = sequence_logps(self.reference_model, batch, chunk_tokens=self.chunk_tokens)
            return chosen, rejected
        if REF_CHOSEN not in batch or REF_REJECTED not in batch:
            raise KeyError(
                f"the batch has no reference log-probs ({REF_CHOSEN}, {REF_REJECTED}) and the objective no reference "
                "model: the DPO stage attaches them in prepare() (dpo.reference: cached) or builds a live reference"
            )
        return batch[REF_CHOSEN].float(), batch[REF_REJECTED].float()

    def pair_losses(
        self,
        policy: tuple[torch.Tensor, torch.Tensor],
        reference: tuple[torch.Tensor, torch.Tensor],
        tokens: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair total loss [B] and its named parts from (chosen, rejected) summed log-probs and token counts."""
        (pi_w, pi_l), (ref_w, ref_l) = policy, reference
        n_w, n_l = tokens[0].clamp_min(1), tokens[1].clamp_min(1)  # filler rows have no tokens
        ratio_w, ratio_l = pi_w - ref_w, pi_l - ref_l
        margin, normed = ratio_w - ratio_l, ratio_w / n_w - ratio_l / n_l
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros_like(margin)
        for loss_type, weight in self.losses:
            h = normed if loss_type in LENGTH_NORMALISED else margin
            parts[loss_type] = preference_loss(loss_type, h, beta=self.beta, label_smoothing=self.label_smoothing)
            total = total + weight * parts[loss_type]
        if self.sft_weight:
            parts["nll"] = -pi_w / n_w
            total = total + self.sft_weight * parts["nll"]
        return total, parts

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        pi_w, pi_l, n_w, n_l = sequence_logps(model, batch, chunk_tokens=self.chunk_tokens)
        ref_w, ref_l = self._reference(batch)
        total, parts = self.pair_losses((pi_w, pi_l), (ref_w, ref_l), (n_w, n_l))
        real = (batch["pair_ids"] >= 0).to(pi_w.dtype)

        def masked_sum(x: torch.Tensor) -> torch.Tensor:
            return (x.detach() * real).sum()

        metrics = {f"loss/{k}": masked_sum(v) for k, v in parts.items() if k != "nll" and len(self.losses) > 1}
        if "nll" in parts:
            metrics["nll_loss"] = masked_sum(parts["nll"])
        reward_w, reward_l = self.beta * (pi_w - ref_w).detach(), self.beta * (pi_l - ref_l).detach()
        metrics |= {
            "rewards/chosen": masked_sum(reward_w),
            "rewards/rejected": masked_sum(reward_l),
            "rewards/accuracies": masked_sum((reward_w > reward_l).to(real.dtype)),
            "rewards/margins": masked_sum(reward_w - reward_l),
            "logps/chosen": masked_sum(pi_w),
            "logps/rejected": masked_sum(pi_l),
            # the SFT loss on the chosen replies (per token), also without sft_weight: how much of what
            # SFT taught DPO gives up on held-out pairs (a gate can bound it against stage.start.*)
            "chosen_nll": masked_sum(-pi_w / n_w.clamp_min(1)),  # filler pairs have no tokens
        }
        return ObjectiveOutput(loss_sum=(total * real).sum(), metric_sums=metrics)

    def cost(self, batch: Batch, flops: FlopModel) -> BatchCost:
        """Policy forward + backward on both completions of every pair; a live reference adds a forward.

        A row's real length is where its last trained label points (completions end the rows), so the
        right padding is not counted.
        """
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        trained = labels != IGNORE_INDEX
        last = torch.where(trained, torch.arange(labels.shape[1], device=labels.device), -1).amax(dim=1)
        lengths = torch.where(last >= 0, last + 2, 0).cpu()
        tokens, logit_tokens = int(lengths.sum()), int(trained.sum())
        pairs = int((lengths * lengths).sum())
        total = flops.training(tokens=tokens, logit_tokens=logit_tokens, attention_pairs=pairs)
        if self.reference_model is not None:
            total += flops.forward(tokens=tokens, logit_tokens=logit_tokens, attention_pairs=pairs)
        return BatchCost(tokens, total)
