"""The RL losses against the papers' formulas, written here independently (plain Python loops over
completions and tokens), on random log-probs, rewards and masks with equal-reward groups and ragged lengths."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from llm_pipeline.train.rl_loss import group_advantages, k3_kl, policy_loss, zero_std_groups

G, P, T = 4, 5, 7


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = G * P
    rewards = torch.randint(0, 3, (n,), generator=g).float()
    rewards[:G] = 1.0  # a group of equal rewards
    rewards[G : 2 * G] = 0.0  # another
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    lengths[0], lengths[1] = T, 1
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).double()
    logps = -torch.rand(n, T, generator=g, dtype=torch.float64) * 3
    old = logps + 0.4 * torch.randn(n, T, generator=g, dtype=torch.float64)  # ratios both inside and outside the clip
    ref = logps + 0.3 * torch.randn(n, T, generator=g, dtype=torch.float64)
    return {"rewards": rewards, "mask": mask, "logps": logps, "old": old, "ref": ref}


def _paper_advantages(rewards: list[float], kind: str) -> list[float]:
    out = []
    for start in range(0, len(rewards), G):
        grp = rewards[start : start + G]
        mean = sum(grp) / G
        for i, r in enumerate(grp):
            if kind == "grpo":  # DeepSeekMath: (r - mean) / std (sample std, TRL's), + 1e-4 against zero
                out.append((r - mean) / (statistics.stdev(grp) + 1e-4))
            elif kind == "dr_grpo":  # Dr. GRPO: no std
                out.append(r - mean)
            else:  # RLOO: r_i - 1/(G-1) sum_{j != i} r_j
                out.append(r - sum(grp[j] for j in range(G) if j != i) / (G - 1))
    return out


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_advantages_match_the_papers(kind: str) -> None:
    d = _data()
    got = group_advantages(d["rewards"], G, kind)
    want = _paper_advantages(d["rewards"].tolist(), kind)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert got[: 2 * G].abs().max() == 0  # equal-reward groups carry no signal


def _token_term(lp: float, old: float, ref: float, a: float, eps_lo: float, eps_hi: float, beta: float) -> float:
    ratio = math.exp(lp - old)
    clipped = min(max(ratio, 1 - eps_lo), 1 + eps_hi)
    kl = math.exp(ref - lp) - (ref - lp) - 1
    return -min(ratio * a, clipped * a) + beta * kl


def _paper_loss(d: dict[str, torch.Tensor], adv: list[float], loss_type: str, eps_lo: float, eps_hi: float,
                beta: float, keep: list[bool]) -> float:  # fmt: skip
    n = len(adv)
    lengths = [int(d["mask"][i].sum()) for i in range(n)]
    terms = [[_token_term(float(d["logps"][i, t]), float(d["old"][i, t]), float(d["ref"][i, t]), adv[i], eps_lo,
                          eps_hi, beta) for t in range(lengths[i])] for i in range(n)]  # fmt: skip
    kept = [i for i in range(n) if keep[i]]
    if loss_type == "grpo":  # 1/G sum_i 1/|o_i| sum_t
        return sum(sum(terms[i]) / lengths[i] for i in kept) / len(kept)
    if loss_type == "dr_grpo":  # 1/(G L) sum_i sum_t, L the max completion length
        return sum(sum(terms[i]) for i in kept) / (len(kept) * T)
    return sum(sum(terms[i]) for i in kept) / sum(lengths[i] for i in kept)  # DAPO eq. 8: token-level


@pytest.mark.parametrize(
    ("loss_type", "adv_kind", "eps_hi", "beta", "filter_groups"),
    [
        ("grpo", "grpo", 0.2, 0.0, False),
        ("grpo", "grpo", 0.2, 0.04, False),  # with the k3 KL
        ("dr_grpo", "dr_grpo", 0.2, 0.0, False),
        ("dapo", "grpo", 0.28, 0.0, True),  # clip-higher and dynamic-sampling filter
        ("grpo", "rloo", 0.2, 0.0, False),
    ],
)
def test_loss_matches_the_papers(
    loss_type: str, adv_kind: str, eps_hi: float, beta: float, filter_groups: bool
) -> None:
    d = _data(1)
    adv = group_advantages(d["rewards"], G, adv_kind).double()
    keep = ~zero_std_groups(d["rewards"], G) if filter_groups else torch.ones(G * P, dtype=torch.bool)
    loss_sum, units, metrics = policy_loss(
        d["logps"], d["old"], adv, d["mask"], loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_hi, beta=beta,
        ref_logps=d["ref"] if beta else None, max_completion_length=T, weights=keep.double(),
    )  # fmt: skip
    want = _paper_loss(d, adv.tolist(), loss_type, 0.2, eps_hi, beta, keep.tolist())
    assert float(loss_sum / units) == pytest.approx(want, rel=1e-9)
    assert 0 < float(metrics["clip_ratio"] / units) < 1  # some tokens clipped, some not
    if beta:
        assert "kl" in metrics and float(metrics["kl"]) > 0


def test_units_make_micro_batching_exact() -> None:
    """Summing two halves' loss sums and units gives the whole batch's loss (the trainer's normalisation)."""
    d = _data(2)
    adv = group_advantages(d["rewards"], G, "grpo").double()
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        kw = {"loss_type": loss_type, "max_completion_length": T}
        whole, units, _ = policy_loss(d["logps"], d["old"], adv, d["mask"], **kw)
        h = G * P // 2
        a = policy_loss(d["logps"][:h], d["old"][:h], adv[:h], d["mask"][:h], **kw)
        b = policy_loss(d["logps"][h:], d["old"][h:], adv[h:], d["mask"][h:], **kw)
        assert float((a[0] + b[0]) / (a[1] + b[1])) == pytest.approx(float(whole / units), rel=1e-12)


def test_k3_is_the_schulman_estimator() -> None:
    d = _data(3)
    got = k3_kl(d["logps"], d["ref"])
    r = torch.exp(d["ref"] - d["logps"])
    assert torch.allclose(got, r - torch.log(r) - 1)
    assert (got >= 0).all()


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_first_step_ratio_is_one_and_gradient_is_the_policy_gradient(loss_type: str) -> None:
    """One optimisation step per rollout: old log-probs are the policy's own (detached), so the ratio is exactly 1
    and the clipped objective's gradient equals the plain policy gradient -A ∇log π (same aggregation)."""
    d = _data(4)
    adv = group_advantages(d["rewards"], G, "grpo").double()
    theta = d["logps"].clone().requires_grad_(True)
    logps = theta * 1.0
    ratio = torch.exp(logps - logps.detach())
    assert torch.equal(ratio, torch.ones_like(ratio))
    loss_sum, units, metrics = policy_loss(
        logps, logps.detach(), adv, d["mask"], loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
        max_completion_length=T,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss_sum / units, theta)
    assert float(metrics["clip_ratio"]) == 0
    theta2 = d["logps"].clone().requires_grad_(True)
    lengths = d["mask"].sum(1, keepdim=True)
    n = G * P
    weights = {"grpo": d["mask"] / lengths / n, "dr_grpo": d["mask"] / (n * T), "dapo": d["mask"] / d["mask"].sum()}
    pg = -(adv.unsqueeze(1) * theta2 * weights[loss_type]).sum()
    (want,) = torch.autograd.grad(pg, theta2)
    assert torch.allclose(grad, want, rtol=1e-12, atol=1e-15)
