"""Format rewards: 1 when the completion matches a regular expression (e.g. ends with ``#### <number>``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: GSM8K's final-answer line.
DEFAULT_PATTERN = r"(?s).*####\s*-?[\d,.]+\s*$"


class FormatReward:
    """``value`` when ``pattern`` matches the whole completion (``re.fullmatch``), else 0."""

    def __init__(self, pattern: str = DEFAULT_PATTERN, value: float = 1.0) -> None:
        try:
            self.pattern = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"format reward: invalid pattern {pattern!r} ({e})") from e
        self.value = value

    def __call__(self, completions: list[str], examples: list[Mapping[str, Any]]) -> list[float]:
        return [self.value if self.pattern.fullmatch(c.strip()) else 0.0 for c in completions]
