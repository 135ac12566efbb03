"""Reward functions of the RL stage: small modules, one per kind of check, combined with weights.

A reward function takes a batch of completions (text) and their examples (the prompt record with its
verifier fields: ``answer``, ``tests``...) and returns one number per completion:

    def my_reward(completions: list[str], examples: list[dict]) -> list[float]: ...

Built-in ones by name (:data:`REWARD_FUNCTIONS`): ``numeric_answer`` (exact match of the final number,
:mod:`~llm_pipeline.rewards.numeric`), ``numeric_distance`` (partial credit for a near miss),
``code_tests`` (the completion's code must pass the example's tests in the sandbox,
:mod:`~llm_pipeline.rewards.code`), ``format`` (a regular expression the completion must match,
:mod:`~llm_pipeline.rewards.format`), ``refusal`` (whether the completion refuses, by the safety eval's
classifier, must match the example's ``refuse`` field, :mod:`~llm_pipeline.rewards.refusal`). Any other
function by its import path (``package.module:function``), see :func:`load_reward`. :class:`CombinedReward`
sums them with weights and keeps each one's values for the ``rewards/<name>/mean`` metrics.

A value ``None`` means "this reward does not apply to this example" (TRL's convention): it adds 0 to the
total and is left out of the reward's metrics. With a mixture of prompt sources (``data.sources``) each
example carries its source's name under :data:`SOURCE_KEY`, and a reward with ``sources`` is only called
on the examples of those sources (None for the others).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import Field, model_validator

from llm_pipeline.config import StrictModel

RewardFn = Callable[[list[str], list[Mapping[str, Any]]], Sequence[float]]

#: Built-in rewards by name -> "module:factory" (the factory takes the spec's ``options`` as keywords).
REWARD_FUNCTIONS: dict[str, str] = {
    "numeric_answer": "llm_pipeline.rewards.numeric:NumericAnswerReward",
    "numeric_distance": "llm_pipeline.rewards.numeric:NumericDistanceReward",
    "code_tests": "llm_pipeline.rewards.code:CodeTestsReward",
    "format": "llm_pipeline.rewards.format:FormatReward",
    "refusal": "llm_pipeline.rewards.refusal:RefusalReward",
}

#: The example key holding the name of the mixture source (``data.sources``) a prompt came from: private (a
#: record's own ``source`` field, which many datasets have, is left alone).
SOURCE_KEY = "_source"


class RewardError(ValueError):
    """A reward function that cannot be loaded or returned something unusable (the message names it)."""


class RewardSpec(StrictModel):
    """One entry of ``rl.rewards``: a built-in ``name`` or a user ``function`` (import path), its weight."""

    name: str | None = Field(None, description=f"Built-in reward: {', '.join(REWARD_FUNCTIONS)}.")
    function: str | None = Field(
        None, description="Your own reward, 'package.module:function' (importable where training runs)."
    )
    weight: float = Field(1.0, description="Its weight in the summed reward.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the built-in reward.")
    sources: list[str] | None = Field(
        None,
        description="With data.sources: the sources whose prompts this reward scores (None for the others); "
        "unset: every source.",
    )

    @model_validator(mode="after")
    def _one(self) -> RewardSpec:
        if (self.name is None) == (self.function is None):
            raise ValueError("a reward needs exactly one of name (built-in) or function (an import path)")
        if self.name is not None and self.name not in REWARD_FUNCTIONS:
            raise ValueError(f"unknown reward {self.name!r}; built-in rewards: {', '.join(REWARD_FUNCTIONS)}")
        if self.sources is not None and not self.sources:
            raise ValueError(f"reward {self.label}: sources is empty; leave it unset to score every source")
        return self

    @property
    def label(self) -> str:
        """Its name in the metrics (``rewards/<label>/mean``)."""
        if self.name is not None:
            return self.name
        assert self.function is not None
        return self.function.replace(":", ".").rsplit(".", 1)[-1]

    def applies_to(self, source: str | None) -> bool:
        """Whether it scores the prompts of ``source`` (a mixture source's name; None: no mixture)."""
        return self.sources is None or source in self.sources


def import_object(path: str, what: str) -> Any:
    """``package.module:attr`` (or ``package.module.attr``) imported, with an error that says what failed."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise RewardError(f"{what} {path!r}: expected an import path 'package.module:function'")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or the module raising while it imports
        raise RewardError(f"{what} {path!r}: cannot import module {module!r} ({type(e).__name__}: {e})") from e
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise RewardError(f"{what} {path!r}: module {module!r} has no attribute {attr!r}") from None


def load_reward(spec: RewardSpec) -> RewardFn:
    """The callable of one spec: a built-in built with its options, or the user's function as it is."""
    if spec.name is not None:
        factory = import_object(REWARD_FUNCTIONS[spec.name], f"reward {spec.name}")
        try:
            return factory(**spec.options)  # type: ignore[no-any-return]
        except TypeError as e:
            raise RewardError(f"reward {spec.name}: bad options {spec.options} ({e})") from e
    assert spec.function is not None
    if spec.options:
        raise RewardError(f"reward {spec.function}: options apply to built-in rewards only")
    fn = import_object(spec.function, "reward function")
    if not callable(fn):
        raise RewardError(f"reward function {spec.function!r} is a {type(fn).__name__}, not a callable")
    return fn  # type: ignore[no-any-return]


def check_rewards(values: Any, n: int, label: str) -> list[float | None]:
    """The values a reward returned as floats (None kept: it does not apply there), or a :class:`RewardError`
    that says what was wrong with them."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise RewardError(
            f"reward {label} returned a {type(values).__name__}; it must return a list of {n} numbers "
            "(one per completion)"
        )
    if len(values) != n:
        raise RewardError(f"reward {label} returned {len(values)} values for {n} completions (one per completion)")
    out = []
    for i, v in enumerate(values):
        if v is None:  # TRL's convention: this reward does not apply to this example (0 in the total)
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise RewardError(f"reward {label} returned {v!r} for completion {i}: rewards must be finite numbers")
        out.append(float(v))
    return out


class CombinedReward:
    """Σ weight_k · reward_k per completion, keeping each reward's values (and counters) for the metrics.

    A reward with ``sources`` is called on the examples of those sources only (by :data:`SOURCE_KEY`); its
    value is None on the others, as where a reward itself returns None: 0 in the total.
    """

    def __init__(self, specs: Sequence[RewardSpec]) -> None:
        if not specs:
            raise RewardError("rl.rewards is empty: name at least one reward")
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise RewardError(f"rl.rewards names a reward twice ({labels}); combine them with weights instead")
        self.specs = list(specs)
        self.parts = [(s.label, s.weight, load_reward(s)) for s in specs]

    def applicable(self, source: str | None) -> list[str]:
        """The labels of the rewards that score ``source``'s prompts, in config order."""
        return [s.label for s in self.specs if s.applies_to(source)]

    def __call__(
        self, completions: list[str], examples: list[Mapping[str, Any]]
    ) -> tuple[list[float], dict[str, list[float | None]]]:
        """(total reward per completion, {label: that reward's values, None where it does not apply})."""
        per: dict[str, list[float | None]] = {}
        total = [0.0] * len(completions)
        for spec, (label, weight, fn) in zip(self.specs, self.parts, strict=True):
            rows = [i for i, ex in enumerate(examples) if spec.applies_to(ex.get(SOURCE_KEY))]
            values: list[float | None] = [None] * len(completions)
            if len(rows) == len(completions):
                values = check_rewards(fn(list(completions), list(examples)), len(completions), label)
            elif rows:
                got = check_rewards(fn([completions[i] for i in rows], [examples[i] for i in rows]), len(rows), label)
                for i, v in zip(rows, got, strict=True):
                    values[i] = v
            per[label] = values
            total = [t + weight * v if v is not None else t for t, v in zip(total, values, strict=True)]
        return total, per

    def counters(self) -> dict[str, float]:
        """Counts the rewards keep (e.g. code that timed out): ``rewards/<label>/<counter>``."""
        out: dict[str, float] = {}
        for label, _, fn in self.parts:
            for k, v in getattr(fn, "counters", dict)().items():
                out[f"rewards/{label}/{k}"] = float(v)
        return out

    def close(self) -> None:
        for _, _, fn in self.parts:
            if hasattr(fn, "close"):
                fn.close()
