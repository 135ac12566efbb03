"""Pure pieces of the loop: the causal-LM objective, the LR schedules, the micro-batch plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_pipeline.model import build_model, get_preset
from llm_pipeline.train.batching import plan_step, split_batch
from llm_pipeline.train.config import TrainingConfig
from llm_pipeline.train.objectives import IGNORE_INDEX, CausalLMObjective
from llm_pipeline.train.optim import lr_factor


def test_causal_lm_objective_matches_cross_entropy_and_z_loss():
    cfg = get_preset("debug")
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    labels = ids[:, 1:].clone()
    labels[0, :3] = IGNORE_INDEX
    batch = {"input_ids": ids[:, :-1], "labels": labels}
    obj = CausalLMObjective(z_loss_weight=1e-3)
    assert obj.count(batch) == 16 - 3
    out = obj(model, batch)
    logits = model(batch["input_ids"]).float()
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    z = torch.logsumexp(logits, -1)[labels != IGNORE_INDEX].pow(2).sum()
    torch.testing.assert_close(out.metric_sums["ce"] / 13, ce)
    torch.testing.assert_close(out.loss_sum, ce * 13 + 1e-3 * z)
    assert obj.perplexity_of == "ce"


def _cfg(**kw) -> TrainingConfig:
    return TrainingConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, **kw)


def test_cosine_schedule():
    cfg = _cfg(lr_schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_wsd_schedule():
    cfg = _cfg(lr_schedule="wsd", wsd_decay_fraction=0.2)
    assert [lr_factor(s, cfg) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_factor(89, cfg) == pytest.approx(1 - 0.9 * 10 / 20)
    assert lr_factor(99, cfg) == pytest.approx(0.1)
    assert lr_factor(50, _cfg(lr_schedule="constant")) == 1.0


def test_linear_schedule_with_warmup_ratio_follows_transformers():
    """After warmup, HF's get_linear_schedule_with_warmup (TRL/open-instruct's default); our warmup
    counts the coming step (step s trains at (s + 1) / warmup, never at 0)."""
    transformers = pytest.importorskip("transformers")
    cfg = TrainingConfig(max_steps=200, warmup_ratio=0.03, min_lr_ratio=0.0, lr_schedule="linear")
    assert cfg.resolved_warmup_steps == 6
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=6, num_training_steps=200)
    for step in range(200):
        expected = (step + 1) / 6 if step < 6 else hf.lr_lambdas[0](step)
        assert lr_factor(step, cfg) == pytest.approx(expected), step
    cfg.max_steps = 1000  # num_epochs resolving max_steps later moves the warmup with it
    assert cfg.resolved_warmup_steps == 30
    with pytest.raises(ValueError, match="warmup_steps or training\\.warmup_ratio"):
        TrainingConfig(warmup_steps=5, warmup_ratio=0.1)


def test_step_plan_keeps_tokens_and_explains_bad_sizes():
    plan = plan_step(8192, 512, 2, micro_tokens=4 * 512)
    assert (plan.micro, plan.accum, plan.rows * 512 * 2) == (4, 2, 8192)
    plan = plan_step(8192, 512, 1, micro_tokens=3 * 512)  # 3 does not divide 16 rows: largest divisor 2
    assert (plan.micro, plan.accum) == (2, 8)
    with pytest.raises(ValueError, match="multiple of seq_len x ranks"):
        plan_step(8192, 512, 3, micro_tokens=512)


def test_split_batch_keeps_rows_in_order_for_any_width():
    """The OOM fallback splits each fetched micro-batch on its rows, so widths may differ between batches."""
    batches = [{"input_ids": torch.arange(8).view(4, 2) + 8 * i, "pair_ids": torch.arange(4) + 4 * i} for i in range(2)]
    batches.append({"input_ids": torch.zeros(4, 5, dtype=torch.long), "pair_ids": torch.arange(8, 12)})
    out = [part for b in batches for part in split_batch(b, 2)]
    assert len(out) == 6 and [tuple(b["input_ids"].shape) for b in out] == [(2, 2)] * 4 + [(2, 5)] * 2
    assert torch.equal(torch.cat([b["input_ids"] for b in out[:4]]), torch.arange(16).view(8, 2))
    assert torch.equal(torch.cat([b["pair_ids"] for b in out]), torch.arange(12))
