"""Exact match of a final numeric answer (GSM8K's convention).

The answer of a text is the number after its last ``####`` (GSM8K writes ``#### 72`` at the end of every
reference solution), else its last number. Numbers compare as values: ``1,000``, ``1000.0`` and ``$1000`` match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_MARK = "####"


def _value(token: str) -> float | None:
    try:
        return float(token.replace(",", "").replace("$", ""))
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The number after the last ``####``, else the last number in ``text``; None when there is none."""
    if _MARK in text:
        tail = text.rsplit(_MARK, 1)[1]
        m = _NUMBER.search(tail)
        return _value(m.group()) if m else None
    found = _NUMBER.findall(text)
    return _value(found[-1]) if found else None


class NumericAnswerReward:
    """1 when the completion's final number equals the example's (``answer_field``), else 0."""

    def __init__(self, answer_field: str = "answer", require_marker: bool = False) -> None:
        self.answer_field = answer_field
        self.require_marker = require_marker

    def __call__(self, completions: list[str], examples: list[Mapping[str, Any]]) -> list[float]:
        out = []
        for text, ex in zip(completions, examples, strict=True):
            if self.answer_field not in ex:
                raise KeyError(f"numeric_answer: the example has no {self.answer_field!r} field (keys: {sorted(ex)})")
            want = final_number(str(ex[self.answer_field]))
            got = None if self.require_marker and _MARK not in text else final_number(text)
            out.append(1.0 if want is not None and got is not None and abs(got - want) < 1e-6 else 0.0)
        return out


class NumericDistanceReward:
    """Partial credit for a near miss: ``max(0, 1 - |got - want| / scale)`` (1 when exact, 0 without a number).

    Denser than the exact match: a group whose answers are all wrong still ranks them, so RL has a signal on
    problems the model cannot solve yet.
    """

    def __init__(self, answer_field: str = "answer", scale: float = 10.0) -> None:
        if scale <= 0:
            raise ValueError(f"numeric_distance: scale must be > 0, got {scale}")
        self.answer_field, self.scale = answer_field, scale

    def __call__(self, completions: list[str], examples: list[Mapping[str, Any]]) -> list[float]:
        out = []
        for text, ex in zip(completions, examples, strict=True):
            if self.answer_field not in ex:
                raise KeyError(f"numeric_distance: the example has no {self.answer_field!r} field (keys: {sorted(ex)})")
            want, got = final_number(str(ex[self.answer_field])), final_number(text)
            out.append(0.0 if want is None or got is None else max(0.0, 1.0 - abs(got - want) / self.scale))
        return out
