"""Policy-gradient losses of the RL stage (GRPO family, RLOO) and its objective.

Notation: a rollout holds ``N = P·G`` completions, ``G`` per prompt (a *group*), rewards ``r_i``,
completion tokens ``o_i`` (``|o_i|`` of them), the policy's token log-probs ``log π(o_it)``, the sampling
policy's ``log π_old(o_it)`` and the reference model's ``log π_ref(o_it)``.

Advantages (one per completion, shared by its tokens), :func:`group_advantages`:

- ``grpo``  (Shao et al. 2024, DeepSeekMath §4.1.2): ``A_i = (r_i - mean_g r) / (std_g r + δ)``, the group's
  unbiased std as in TRL; a group of equal rewards gets 0.
- ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-like training"): ``A_i = r_i - mean_g r`` (no std).
- ``rloo`` (Ahmadian et al. 2024): the leave-one-out baseline ``A_i = r_i - mean_{j≠i} r_j``.

Per token, with ``ρ = exp(log π - log π_old)`` and clip range ``[1 - ε_low, 1 + ε_high]`` (PPO, Schulman 2017;
DAPO's asymmetric "clip-higher" when ``ε_high > ε_low``):

    ℓ_it = -min(ρ A_i, clip(ρ, 1 - ε_low, 1 + ε_high) A_i) + β · k3_it
    k3_it = exp(log π_ref - log π) - (log π_ref - log π) - 1      (Schulman's k3 KL estimator)

and the loss aggregates the tokens by ``loss_type`` (:data:`LOSS_TYPES`):

- ``grpo``:    ``1/N Σ_i 1/|o_i| Σ_t ℓ_it``      (per-sequence mean, then mean over sequences)
- ``dr_grpo``: ``1/(N·L) Σ_i Σ_t ℓ_it``          (a constant ``L``: the maximum completion length)
- ``dapo``:    ``1/Σ_i |o_i| Σ_i Σ_t ℓ_it``      (token-level, Yu et al. 2025 eq. 8)

Each aggregation is a sum over units divided by the units' count, so the objective returns the *sum* and
the trainer divides by the units of the whole global batch (completions, ``L`` per completion, or tokens):
the loss does not depend on micro-batching or ranks. DAPO's filtering of groups whose rewards are all
equal (their advantage is 0 and they would only dilute the normaliser) is done when the rollout is
built: their completions get no loss units.

With one optimisation step per rollout the sampling policy *is* the policy: ``log π_old`` is then
``log π`` detached (as TRL does), so the ratio is exactly 1 and the gradient is the plain policy gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from llm_pipeline.model.flops import FlopModel
from llm_pipeline.train.objectives import (
    DEFAULT_CHUNK_TOKENS,
    IGNORE_INDEX,
    Batch,
    BatchCost,
    Objective,
    ObjectiveOutput,
    _chunked,
    _trained_rows,
)

AdvantageType = Literal["grpo", "dr_grpo", "rloo"]
LossType = Literal["grpo", "dr_grpo", "dapo"]
ADVANTAGE_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "rloo")
LOSS_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo")
#: Batch keys: per-completion advantage [B], loss weight [B] (0: filtered or filler), per-token log-probs [B, T].
ADVANTAGES, WEIGHTS, OLD_LOGPS, REF_LOGPS = "advantages", "loss_weights", "old_logps", "ref_logps"


def group_advantages(
    rewards: torch.Tensor, group_size: int, advantage: str = "grpo", *, eps: float = 1e-4
) -> torch.Tensor:
    """Advantages [N] of rewards [N] laid out group after group (``group_size`` completions per prompt)."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} are not whole groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    if advantage == "grpo":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        return ((r - mean) / (std + eps)).flatten()
    if advantage == "dr_grpo":
        return (r - mean).flatten()
    if advantage == "rloo":
        if group_size < 2:
            raise ValueError("the leave-one-out baseline needs at least 2 completions per prompt")
        return (r - (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)).flatten()
    raise ValueError(f"unknown advantage {advantage!r}; choose from {', '.join(ADVANTAGE_TYPES)}")


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] True for completions whose group's rewards are all equal (no learning signal)."""
    r = rewards.view(-1, group_size)
    same = (r == r[:, :1]).all(dim=1)
    return same.repeat_interleave(group_size)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π || π_ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(loss sum, units, metric sums) of the clipped objective; ``loss sum / units`` is the paper's loss.

    ``logps``, ``old_logps``, ``ref_logps``, ``mask`` are [B, T] (mask 1 on completion tokens), ``advantages``
    and ``weights`` [B] (weight 0 drops a completion: a filtered group or a filler row). The metric sums
    (``clip_ratio``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``kl``) are aggregated like the
    loss, so dividing them by the units gives the same kind of mean.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    if weights is not None:
        mask = mask * weights.to(logps.dtype).unsqueeze(1)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics_tok: dict[str, torch.Tensor] = {
        "clip_ratio/low_mean": ((ratio < 1 - epsilon_low) & (adv < 0)).to(logps.dtype),
        "clip_ratio/high_mean": ((ratio > 1 + eps_high) & (adv > 0)).to(logps.dtype),
    }
    metrics_tok["clip_ratio"] = metrics_tok["clip_ratio/low_mean"] + metrics_tok["clip_ratio/high_mean"]
    if beta > 0 or ref_logps is not None:
        if ref_logps is None:
            raise ValueError("a KL penalty (beta > 0) needs the reference model's log-probs")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics_tok["kl"] = kl.detach()
    loss_w, metric_w, units = token_weights(mask, loss_type, max_completion_length)
    loss_sum = (per_token * loss_w).sum()
    metrics = {k: (v * metric_w).sum().detach() for k, v in metrics_tok.items()}
    return loss_sum, units, metrics


def token_weights(
    mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss weights [B, T], metric weights [B, T], units) of a (weighted) completion mask per ``loss_type``.

    ``Σ loss_w · ℓ / units`` is the loss; ``Σ metric_w · m / units`` is a per-token metric's mean of the same
    kind (per token for dapo, per sequence otherwise; for dr_grpo the loss's constant normaliser would
    shrink a metric with the completions' length, so its metrics are per-sequence means).
    """
    lengths = mask.sum(dim=1)
    seqs = (lengths > 0).to(mask.dtype)
    per_seq = mask / lengths.clamp_min(1e-8).unsqueeze(1)  # each completion's tokens weigh 1 in all
    if loss_type == "dapo":
        return mask, mask, mask.sum().detach()
    if loss_type == "grpo":
        return per_seq, per_seq, seqs.sum().detach()
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type dr_grpo normalises by a constant: pass max_completion_length")
        length = float(max_completion_length)
        return mask, per_seq * length, (seqs.sum() * length).detach()
    raise ValueError(f"unknown loss_type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")


def completion_logps(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) [B, T] in fp32 with gradient, entropy of the next-token distribution [B, T] detached),
    both 0 where the label is -100; the head runs on completion positions only, in chunks.

    The logits are divided by the sampling ``temperature`` first (as TRL does): the loss then scores the
    distribution the completions were drawn from."""

    def chunk(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float()
        if temperature != 1.0:
            logits = logits / temperature
        lse = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1)
        with torch.no_grad():
            ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        return picked - lse, ent

    h, y = _trained_rows(hidden, labels, trained_only=True)
    keep = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
    logp = hidden.new_zeros(labels.numel(), dtype=torch.float32)
    ent = hidden.new_zeros(labels.numel(), dtype=torch.float32)
    if len(keep):
        parts = _chunked(chunk, h.shape[0], chunk_tokens, h, y)
        logp = logp.index_put((keep,), torch.cat([p[0] for p in parts])[: len(keep)])
        ent = ent.index_put((keep,), torch.cat([p[1] for p in parts])[: len(keep)].detach())
    return logp.view_as(labels), ent.view_as(labels)


class RLObjective(Objective):
    """The clipped policy-gradient loss over a rollout's completions (see the module docstring).

    Batch: ``input_ids`` [B, T] (prompt + completion, right-padded), ``labels`` [B, T] (completion tokens,
    -100 elsewhere), ``advantages`` [B], ``loss_weights`` [B], optionally ``old_logps`` [B, T] (the sampling
    policy's, when a rollout is used for more than one step) and ``ref_logps`` [B, T] (the KL's reference).
    A held-out batch (``correct`` [B] present, from the evaluation source) reports accuracy instead.
    """

    console_metrics = (("reward", "reward {:.3f}"), ("kl", "kl {:.4f}"))

    def __init__(
        self,
        *,
        loss_type: str = "grpo",
        epsilon_low: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.0,
        max_completion_length: int,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        temperature: float = 1.0,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"rl.loss_type {loss_type!r}: choose from {', '.join(LOSS_TYPES)}")
        self.loss_type, self.beta = loss_type, beta
        self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high
        self.max_completion_length = max_completion_length
        self.chunk_tokens, self.temperature = chunk_tokens, temperature

    def _mask(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX) & (batch[WEIGHTS] > 0).unsqueeze(1)

    def count(self, batch: Batch) -> int:
        if "correct" in batch:
            return int((batch[WEIGHTS] > 0).sum())
        mask = self._mask(batch)
        if self.loss_type == "dapo":
            return int(mask.sum())
        seqs = int(mask.any(dim=1).sum())
        return seqs * (self.max_completion_length if self.loss_type == "dr_grpo" else 1)

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        if "correct" in batch:  # held-out prompts, answered greedily when the source was read
            real = (batch[WEIGHTS] > 0).float()
            correct = (batch["correct"].float() * real).sum()
            return ObjectiveOutput(
                loss_sum=real.sum() - correct,  # the error rate as the eval "loss"
                metric_sums={"accuracy": correct, "reward": (batch["reward"].float() * real).sum()},
            )
        labels = batch["labels"]
        logps, entropy = model(
            batch["input_ids"],
            head_fn=lambda h, head: completion_logps(
                head, h, labels, chunk_tokens=self.chunk_tokens, temperature=self.temperature
            ),
        )
        old = batch[OLD_LOGPS].float() if OLD_LOGPS in batch else logps.detach()
        mask = (labels != IGNORE_INDEX).float()
        loss_sum, _, metrics = policy_loss(
            logps,
            old,
            batch[ADVANTAGES],
            mask,
            loss_type=self.loss_type,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            beta=self.beta,
            ref_logps=batch[REF_LOGPS].float() if self.beta > 0 else None,
            max_completion_length=self.max_completion_length,
            weights=batch[WEIGHTS],
        )
        _, metric_w, _ = token_weights(mask * batch[WEIGHTS].float().unsqueeze(1), self.loss_type,
                                       self.max_completion_length)  # fmt: skip
        metrics["entropy"] = (entropy * metric_w).sum().detach()
        return ObjectiveOutput(loss_sum=loss_sum, metric_sums=metrics)

    def cost(self, batch: Batch, flops: FlopModel) -> BatchCost:
        """Forward + backward over each row's prompt and completion (right padding not counted)."""
        if "correct" in batch:
            return BatchCost(0, 0.0)
        labels = batch["labels"]
        trained = labels != IGNORE_INDEX
        last = torch.where(trained, torch.arange(labels.shape[1], device=labels.device), -1).amax(dim=1)
        lengths = torch.where(last >= 0, last + 2, 0).cpu()
        tokens, logit_tokens = int(lengths.sum()), int(trained.sum())
        return BatchCost(tokens, flops.training(tokens=tokens, logit_tokens=logit_tokens,
                                                attention_pairs=int((lengths * lengths).sum())))  # fmt: skip
