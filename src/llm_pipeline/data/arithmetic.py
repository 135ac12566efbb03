"""The embedded arithmetic task: "What is 23 + 45?" -> "23 + 45 = 68", offline and exactly checkable.

Small enough for the demo's tiny model to learn on CPU in minutes, and verifiable by a program, so it is
both an SFT chat source (``data.kind: arithmetic``, which teaches the format and part of the task) and the
RL stage's default prompts (the reward checks the final number). Problems are every ``a + b`` with
``0 <= a, b <= max_operand`` (and, with ``max_smaller_operand``, ``min(a, b)`` at most that: one
single-digit operand is a task the demo's tiny model half-learns in a minute of SFT, so RL has room to
raise it); a fixed hash of the unordered pair puts 1 in ``val_every`` of them in the held-out split
(``a + b`` and ``b + a`` always together: a twin in training would be recall, not skill), so SFT, RL and
the ``arithmetic_accuracy`` evaluation agree on which problems were never trained on when they are given
the same task settings (:class:`~llm_pipeline.data.config.ArithmeticTaskFields`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from llm_pipeline.data.config import ARITHMETIC_MAX_OPERAND, ARITHMETIC_VAL_EVERY, ArithmeticTaskFields
from llm_pipeline.data.sources import Item
from llm_pipeline.hashing import hash64

MAX_OPERAND = ARITHMETIC_MAX_OPERAND
VAL_EVERY = ARITHMETIC_VAL_EVERY
SOURCE = "embedded:arithmetic"


def split_of(a: int, b: int, val_every: int = VAL_EVERY) -> str:
    """``train`` or ``val`` for the problem a + b and its twin b + a (stable across runs and machines)."""
    return "val" if hash64(f"{min(a, b)}+{max(a, b)}") % val_every == 0 else "train"


def problems(
    split: str, *, max_operand: int = MAX_OPERAND, max_smaller_operand: int | None = None, val_every: int = VAL_EVERY
) -> list[tuple[int, int]]:
    """Every (a, b) of ``split`` in a fixed order."""
    if split not in ("train", "val"):
        raise ValueError(f"arithmetic split must be train or val, got {split!r}")
    n = max_operand + 1
    small = max_operand if max_smaller_operand is None else max_smaller_operand
    return [(a, b) for a in range(n) for b in range(n) if min(a, b) <= small and split_of(a, b, val_every) == split]


def task_of(cfg: ArithmeticTaskFields) -> dict[str, Any]:
    """The task settings of a config section, as :func:`problems`' keywords."""
    return {name: getattr(cfg, name) for name in ArithmeticTaskFields.model_fields}


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def answer(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}"


def prompt_record(a: int, b: int) -> dict[str, Any]:
    """An RL prompt with its verifier: the user turn and the expected final number."""
    return {"messages": [{"role": "user", "content": question(a, b)}], "answer": str(a + b), "id": f"{a}+{b}"}


def prompt_records(split: str, **task: Any) -> list[dict[str, Any]]:
    """The RL prompts of ``split``; ``task``: :func:`problems`' keywords."""
    return [prompt_record(a, b) for a, b in problems(split, **task)]


def chat_records(*, seed: int = 0, **task: Any) -> Iterator[Item]:
    """SFT records (``messages`` with the answer): the held-out problems, then the training ones shuffled
    (held-out first, so a cap on training records still reads the whole validation split).

    ``Item.meta['split']`` carries the split, as the embedded stdlib set does.
    """
    rng = random.Random(seed)
    for split in ("val", "train"):
        pairs = problems(split, **task)
        rng.shuffle(pairs)
        for a, b in pairs:
            messages = [{"role": "user", "content": question(a, b)}, {"role": "assistant", "content": answer(a, b)}]
            yield Item(f"{SOURCE}:{a}+{b}", doc_id=f"{SOURCE}:{a}+{b}", meta={"split": split},
                       record={"messages": messages})  # fmt: skip


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
