"""The embedded arithmetic task: the demo's `largest` task and the easier addition setting, their held-out
splits (never trained on by SFT or RL), formats, and the reward and evaluation that score them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llm_pipeline.data import arithmetic
from llm_pipeline.data.config import SFTDataConfig
from llm_pipeline.eval.arithmetic import ArithmeticConfig
from llm_pipeline.rewards.numeric import NumericAnswerReward
from llm_pipeline.train.rl_data import RLDataConfig

TASK = {"max_operand": 99, "max_smaller_operand": 9, "val_every": 4}  # one single-digit operand
LARGEST = {"operation": "largest", "operands": 4, "min_operand": 0, "max_operand": 9, "pool_size": 2520,
           "val_every": 4}  # fmt: skip  # configs/demo/*.yaml's task


def test_single_digit_operand_task_holds_out_twins_and_enough_problems() -> None:
    train, val = arithmetic.problems("train", **TASK), arithmetic.problems("val", **TASK)
    assert len(train) + len(val) == 100 * 100 - 90 * 90  # every pair with an operand of 0..9
    assert all(min(a, b) <= 9 for a, b in train + val)
    assert len(val) >= 400  # a small standard error for the demo's RL gate (462 today)
    unordered = {frozenset(p) for p in train}
    assert not any(frozenset(p) in unordered for p in val)  # neither a + b nor its twin b + a trained on
    # the default task is unchanged (its held-out split keeps the problems it always had)
    assert len(arithmetic.problems("val")) == 1002


def test_largest_task_is_fixed_disjoint_and_formatted() -> None:
    train, val = arithmetic.problems("train", **LARGEST), arithmetic.problems("val", **LARGEST)
    assert len(train) + len(val) == 2520 and len(val) >= 500  # the demo's RL gate reads 534
    assert arithmetic.problems("val", **LARGEST) == val  # the same draw every time
    assert all(len(set(p)) == 4 and all(0 <= x <= 9 for x in p) for p in train + val)
    assert not {tuple(sorted(p)) for p in train} & {tuple(sorted(p)) for p in val}  # no reordering trained on
    rec = arithmetic.prompt_record((37, 82, 15), "largest")
    assert rec["messages"][0]["content"] == "Which is largest: 37, 82, 15?" and rec["answer"] == "82"
    assert arithmetic.answer((37, 82, 15), "largest") == "The largest is 82."
    # the RL reward scores the right answer 1 and any other number (a copied operand) 0
    replies = ["The largest is 82.", "The largest is 37.", "82, not 15"]
    assert NumericAnswerReward()(replies, [rec] * 3) == [1.0, 0.0, 0.0]


def test_sft_rl_and_eval_configs_give_the_same_held_out_problems() -> None:
    for task in (TASK, LARGEST):
        sft = SFTDataConfig(kind="arithmetic", **task)
        rl = RLDataConfig(kind="arithmetic", **task)
        ev = ArithmeticConfig(**task)
        sft_val = [i.record["messages"] for i in arithmetic.sft_records_of(sft) if i.meta["split"] == "val"]
        sft_train = {i.record["messages"][0]["content"] for i in arithmetic.sft_records_of(sft)
                     if i.meta["split"] == "train"}  # fmt: skip
        rl_val = {i.record["id"]: i.record for i in arithmetic.rl_records_of(rl) if i.meta["split"] == "val"}
        rl_train = {i.record["messages"][0]["content"] for i in arithmetic.rl_records_of(rl)
                    if i.meta["split"] == "train"}  # fmt: skip
        eval_recs = arithmetic.prompt_records("val", **arithmetic.task_of(ev))
        assert set(rl_val) == {r["id"] for r in eval_recs} and len(sft_val) == len(eval_recs)
        questions = {r["messages"][0]["content"] for r in eval_recs}
        assert {m[0]["content"] for m in sft_val} == questions and not questions & (sft_train | rl_train)
        # the SFT answer of every held-out problem is what the reward (and so the evaluation) scores correct
        by_q = {r["messages"][0]["content"]: r for r in eval_recs}
        replies = [m[1]["content"] for m in sft_val]
        assert NumericAnswerReward()(replies, [by_q[m[0]["content"]] for m in sft_val]) == [1.0] * len(sft_val)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"operation": "add", "operands": 3}, "operation add takes 2 operands"),
        ({"operation": "largest", "max_smaller_operand": 9}, "max_smaller_operand is for operation add"),
        ({"operation": "add", "pool_size": 500}, "pool_size is for operation largest"),
        ({"operation": "largest", "operands": 3, "min_operand": 10, "max_operand": 11}, "needs 3 distinct numbers"),
        ({"operation": "largest", "max_operand": 9, "pool_size": 500}, "more than half"),
        ({"operation": "mul"}, "operation"),
    ],
)
def test_bad_task_settings_name_the_key(settings: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RLDataConfig(kind="arithmetic", **settings)
