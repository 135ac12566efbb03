"""The embedded arithmetic task: "What is 23 + 45?" -> "23 + 45 = 68", offline and exactly checkable.

Small enough for the demo's tiny model to learn on CPU in minutes, and verifiable by a program, so it is
both an SFT chat source (``data.kind: arithmetic``, which teaches the format and part of the task) and the
RL stage's default prompts (the reward checks the final number). Problems are every ``a + b`` with
``0 <= a, b <= max_operand``; a fixed hash of the unordered pair puts 1 in ``VAL_EVERY`` of them in the
held-out split (``a + b`` and ``b + a`` always together: a twin in training would be recall, not skill),
so SFT, RL and the ``arithmetic_accuracy`` evaluation agree on which problems were never trained on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from llm_pipeline.data.sources import Item
from llm_pipeline.hashing import hash64

MAX_OPERAND = 99
VAL_EVERY = 10
SOURCE = "embedded:arithmetic"


def split_of(a: int, b: int) -> str:
    """``train`` or ``val`` for the problem a + b and its twin b + a (stable across runs and machines)."""
    return "val" if hash64(f"{min(a, b)}+{max(a, b)}") % VAL_EVERY == 0 else "train"


def problems(split: str, *, max_operand: int = MAX_OPERAND) -> list[tuple[int, int]]:
    """Every (a, b) of ``split`` in a fixed order."""
    if split not in ("train", "val"):
        raise ValueError(f"arithmetic split must be train or val, got {split!r}")
    n = max_operand + 1
    return [(a, b) for a in range(n) for b in range(n) if split_of(a, b) == split]


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def answer(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}"


def prompt_record(a: int, b: int) -> dict[str, Any]:
    """An RL prompt with its verifier: the user turn and the expected final number."""
    return {"messages": [{"role": "user", "content": question(a, b)}], "answer": str(a + b), "id": f"{a}+{b}"}


def prompt_records(split: str, *, max_operand: int = MAX_OPERAND) -> list[dict[str, Any]]:
    return [prompt_record(a, b) for a, b in problems(split, max_operand=max_operand)]


def chat_records(*, max_operand: int = MAX_OPERAND, seed: int = 0) -> Iterator[Item]:
    """SFT records (``messages`` with the answer): the held-out problems, then the training ones shuffled
    (held-out first, so a cap on training records still reads the whole validation split).

    ``Item.meta['split']`` carries the split, as the embedded stdlib set does.
    """
    rng = random.Random(seed)
    for split in ("val", "train"):
        pairs = problems(split, max_operand=max_operand)
        rng.shuffle(pairs)
        for a, b in pairs:
            messages = [{"role": "user", "content": question(a, b)}, {"role": "assistant", "content": answer(a, b)}]
            yield Item(f"{SOURCE}:{a}+{b}", doc_id=f"{SOURCE}:{a}+{b}", meta={"split": split},
                       record={"messages": messages})  # fmt: skip


def sft_records_of(cfg: Any) -> Iterator[Item]:
    """The SFT chat source ``kind: arithmetic`` (the registry calls every embedded source with its config)."""
    return chat_records(max_operand=getattr(cfg, "max_operand", MAX_OPERAND))


def rl_records_of(cfg: Any) -> Iterator[Item]:
    """The RL prompts ``kind: arithmetic`` (records with their verifier), held-out first like the SFT source."""
    max_operand = getattr(cfg, "max_operand", MAX_OPERAND)
    for split in ("val", "train"):
        for rec in prompt_records(split, max_operand=max_operand):
            where = f"arithmetic:{rec['id']}"
            yield Item(where, doc_id=f"{SOURCE}:{rec['id']}", meta={"split": split}, record=rec)
