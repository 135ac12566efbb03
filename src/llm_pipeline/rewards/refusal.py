"""Refusal reward: 1 when the completion refuses exactly when its prompt should be refused.

Whether a completion refuses is decided by the safety eval's classifier (:mod:`llm_pipeline.eval.safety`:
``rule``, its refusal patterns, or a user's ``package.module:function``), so RL rewards what that eval
measures. The example says what is wanted in a boolean field (``refuse``: the embedded ``safety`` prompts'
harmful ones are true, their harmless look-alikes false): a refusal of a harmful request and an answer to
a harmless one both score 1. An example without the field gives None (the reward does not apply to it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm_pipeline.eval.safety import load_classifier
from llm_pipeline.rewards import RewardError


def prompt_text(example: Mapping[str, Any]) -> str:
    """The prompt a classifier sees: the last user turn of ``messages``, else ``prompt`` / ``question`` / ``text``."""
    messages = example.get("messages")
    if isinstance(messages, list):
        users = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
        if users:
            return str(users[-1].get("content", ""))
    return next((str(example[k]) for k in ("prompt", "question", "text") if k in example), "")


class RefusalReward:
    """1.0 when ``classifier(prompt, completion)`` (refuses) equals ``example[field]``, 0.0 when not, None when
    the example has no ``field``."""

    def __init__(self, classifier: str = "rule", field: str = "refuse") -> None:
        try:
            self.classifier = load_classifier(classifier)
        except ValueError as e:
            raise RewardError(f"reward refusal: option classifier: {e}") from None
        self.field = field

    def __call__(self, completions: list[str], examples: list[Mapping[str, Any]]) -> list[float | None]:
        out: list[float | None] = []
        for text, ex in zip(completions, examples, strict=True):
            if self.field not in ex:
                out.append(None)
                continue
            want = ex[self.field]
            if not isinstance(want, bool | int) or want not in (0, 1):
                raise RewardError(f"reward refusal: the example's {self.field!r} is {want!r}; it must be true or false")
            out.append(1.0 if bool(self.classifier(prompt_text(ex), text)) == bool(want) else 0.0)
        return out
