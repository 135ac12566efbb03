"""The embedded arithmetic task's easier setting (one single-digit operand): what the demo's RL stage learns."""

from __future__ import annotations

from llm_pipeline.data import arithmetic
from llm_pipeline.data.config import SFTDataConfig
from llm_pipeline.eval.arithmetic import ArithmeticConfig
from llm_pipeline.train.rl_data import RLDataConfig

TASK = {"max_operand": 99, "max_smaller_operand": 9, "val_every": 4}  # configs/demo/*.yaml's task


def test_single_digit_operand_task_holds_out_twins_and_enough_problems() -> None:
    train, val = arithmetic.problems("train", **TASK), arithmetic.problems("val", **TASK)
    assert len(train) + len(val) == 100 * 100 - 90 * 90  # every pair with an operand of 0..9
    assert all(min(a, b) <= 9 for a, b in train + val)
    assert len(val) >= 400  # a small standard error for the demo's RL gate (462 today)
    unordered = {frozenset(p) for p in train}
    assert not any(frozenset(p) in unordered for p in val)  # neither a + b nor its twin b + a trained on
    # the default task is unchanged (its held-out split keeps the problems it always had)
    assert len(arithmetic.problems("val")) == 1002


def test_sft_rl_and_eval_configs_give_the_same_held_out_problems() -> None:
    sft = SFTDataConfig(kind="arithmetic", **TASK)
    rl = RLDataConfig(kind="arithmetic", **TASK)
    ev = ArithmeticConfig(**TASK)
    sft_ids = {item.record["messages"][0]["content"] for item in arithmetic.sft_records_of(sft)
               if item.meta["split"] == "val"}  # fmt: skip
    rl_ids = {item.record["id"] for item in arithmetic.rl_records_of(rl) if item.meta["split"] == "val"}
    eval_ids = {r["id"] for r in arithmetic.prompt_records("val", **arithmetic.task_of(ev))}
    assert rl_ids == eval_ids and len(sft_ids) == len(eval_ids)
    assert sft_ids == {arithmetic.question(*map(int, i.split("+"))) for i in eval_ids}
