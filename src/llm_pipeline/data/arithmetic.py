"""The embedded arithmetic task: offline, exactly checkable questions with a numeric answer.

Two operations (:class:`~llm_pipeline.data.config.ArithmeticTaskFields`):

- ``add``: "What is 23 + 45?" -> "23 + 45 = 68", every ``a + b`` with ``0 <= a, b <= max_operand`` (and, with
  ``max_smaller_operand``, ``min(a, b)`` at most that); a fixed hash of the unordered pair puts 1 in
  ``val_every`` of them in the held-out split (``a + b`` and ``b + a`` always together: a twin in training
  would be recall, not skill). The demo's tiny model memorises the training sums without generalising
  addition (held-out 1-2% after its SFT), so RL has nothing to sharpen.
- ``largest``: "Which is largest: 37, 82, 15?" -> "The largest is 82.", ``pool_size`` problems of
  ``operands`` distinct numbers in ``min_operand..max_operand`` drawn with a fixed seed, split by a hash of
  the sorted numbers (every reordering of a held-out problem is held out). Each number is written after a
  space in the question and the answer, so it is the same tokens in both; copying any number scores 1 in
  ``operands`` by chance, comparing lifts it, and sampling finds the right one often enough for GRPO.

Small enough for the demo's tiny model to learn on CPU in minutes and verifiable by a program, it is both an
SFT chat source (``data.kind: arithmetic``) and the RL stage's default prompts (the ``numeric_answer`` reward
checks the final number); SFT, RL and the ``arithmetic_accuracy`` evaluation agree on which problems were
never trained on when they are given the same task settings.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from llm_pipeline.data.config import (
    ARITHMETIC_MAX_OPERAND,
    ARITHMETIC_POOL_SIZE,
    ARITHMETIC_VAL_EVERY,
    ArithmeticTaskFields,
)
from llm_pipeline.data.sources import Item
from llm_pipeline.hashing import hash64

MAX_OPERAND = ARITHMETIC_MAX_OPERAND
VAL_EVERY = ARITHMETIC_VAL_EVERY
SOURCE = "embedded:arithmetic"
_POOL_SEED = "arithmetic:largest"  # the fixed draw of the largest task's problems (a str seeds the same everywhere)

Problem = tuple[int, ...]


def split_of(a: int, b: int, val_every: int = VAL_EVERY) -> str:
    """``train`` or ``val`` for the problem a + b and its twin b + a (stable across runs and machines)."""
    return "val" if hash64(f"{min(a, b)}+{max(a, b)}") % val_every == 0 else "train"


def _split_of_largest(numbers: Problem, val_every: int) -> str:
    """``train`` or ``val`` for a largest problem and every reordering of its numbers."""
    return "val" if hash64("largest:" + ",".join(map(str, sorted(numbers)))) % val_every == 0 else "train"


def _largest_pool(operands: int, min_operand: int, max_operand: int, pool_size: int) -> list[Problem]:
    """``pool_size`` distinct tuples of distinct numbers, the same on every run and machine."""
    rng = random.Random(f"{_POOL_SEED}:{operands}:{min_operand}:{max_operand}")
    numbers = range(min_operand, max_operand + 1)
    seen: set[Problem] = set()
    pool: list[Problem] = []
    while len(pool) < pool_size:  # the config caps pool_size at half the space: few redraws
        p = tuple(rng.sample(numbers, operands))
        if p not in seen:
            seen.add(p)
            pool.append(p)
    return pool


def problems(
    split: str,
    *,
    operation: str = "add",
    operands: int = 2,
    min_operand: int = 0,
    max_operand: int = MAX_OPERAND,
    max_smaller_operand: int | None = None,
    pool_size: int = ARITHMETIC_POOL_SIZE,
    val_every: int = VAL_EVERY,
) -> list[Problem]:
    """Every problem (its numbers) of ``split`` in a fixed order."""
    if split not in ("train", "val"):
        raise ValueError(f"arithmetic split must be train or val, got {split!r}")
    if operation == "largest":
        pool = _largest_pool(operands, min_operand, max_operand, pool_size)
        return [p for p in pool if _split_of_largest(p, val_every) == split]
    if operation != "add":
        raise ValueError(f"arithmetic operation must be add or largest, got {operation!r}")
    n = max_operand + 1
    small = max_operand if max_smaller_operand is None else max_smaller_operand
    return [(a, b) for a in range(min_operand, n) for b in range(min_operand, n)
            if min(a, b) <= small and split_of(a, b, val_every) == split]  # fmt: skip


def task_of(cfg: ArithmeticTaskFields) -> dict[str, Any]:
    """The task settings of a config section, as :func:`problems`' keywords."""
    return {name: getattr(cfg, name) for name in ArithmeticTaskFields.model_fields}


def question(numbers: Problem, operation: str = "add") -> str:
    if operation == "largest":
        return f"Which is largest: {', '.join(map(str, numbers))}?"
    a, b = numbers
    return f"What is {a} + {b}?"


def result(numbers: Problem, operation: str = "add") -> int:
    """The exact answer: what the ``numeric_answer`` reward compares the reply's final number with."""
    return max(numbers) if operation == "largest" else sum(numbers)


def answer(numbers: Problem, operation: str = "add") -> str:
    if operation == "largest":
        return f"The largest is {max(numbers)}."
    a, b = numbers
    return f"{a} + {b} = {a + b}"


def problem_id(numbers: Problem, operation: str = "add") -> str:
    return f"max({','.join(map(str, numbers))})" if operation == "largest" else "+".join(map(str, numbers))


def prompt_record(numbers: Problem, operation: str = "add") -> dict[str, Any]:
    """An RL prompt with its verifier: the user turn and the expected final number."""
    return {"messages": [{"role": "user", "content": question(numbers, operation)}],
            "answer": str(result(numbers, operation)), "id": problem_id(numbers, operation)}  # fmt: skip


def prompt_records(split: str, **task: Any) -> list[dict[str, Any]]:
    """The RL prompts of ``split``; ``task``: :func:`problems`' keywords."""
    op = task.get("operation", "add")
    return [prompt_record(p, op) for p in problems(split, **task)]


def chat_records(*, seed: int = 0, **task: Any) -> Iterator[Item]:
    """SFT records (``messages`` with the answer): the held-out problems, then the training ones shuffled
    (held-out first, so a cap on training records still reads the whole validation split).

    ``Item.meta['split']`` carries the split, as the embedded stdlib set does.
    """
    rng = random.Random(seed)
    op = task.get("operation", "add")
    for split in ("val", "train"):
        probs = problems(split, **task)
        rng.shuffle(probs)
        for p in probs:
            messages = [{"role": "user", "content": question(p, op)}, {"role": "assistant", "content": answer(p, op)}]
            where = f"{SOURCE}:{problem_id(p, op)}"
            yield Item(where, doc_id=where, meta={"split": split}, record={"messages": messages})


def sft_records_of(cfg: Any) -> Iterator[Item]:
    """The SFT chat source ``kind: arithmetic`` (the registry calls every embedded source with its config)."""
    return chat_records(**task_of(cfg))


def rl_records_of(cfg: Any) -> Iterator[Item]:
    """The RL prompts ``kind: arithmetic`` (records with their verifier), held-out first like the SFT source."""
    task = task_of(cfg)
    for split in ("val", "train"):
        for rec in prompt_records(split, **task):
            where = f"arithmetic:{rec['id']}"
            yield Item(where, doc_id=f"{SOURCE}:{rec['id']}", meta={"split": split}, record=rec)
