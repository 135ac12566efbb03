"""``data.sources``: a stage's data as a weighted mixture of named sources, each with its own reader.

The config side of :mod:`llm_pipeline.data.mixing` (kept free of torch so configs load fast): the
entry schema, the checks that name the offending source, and the shares a mixture resolves to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# --------------------------------------------------------------------------------------------
# Config: data.sources
# --------------------------------------------------------------------------------------------


class MixtureSource(BaseModel):
    """One entry of ``data.sources``: a name, how much of the mixture it is, and its own reader.

    Every other key is the source's reader, with the keys of the stage's ``data`` section (a packed
    folder for token stages: ``path``, ``train_split``, ``val_split``; chat stages: ``kind``, ``paths``,
    ``dataset``, ``split``, ...). Exactly one of ``weight``, the budget (``tokens`` for token stages,
    ``examples`` for example stages) or ``epochs`` sets its share.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str = Field(min_length=1, description="The source's name in metrics (eval/<name>/loss), logs and reports.")
    weight: float | None = Field(None, description="Share of the mixture (normalised over the sources).")
    tokens: int | None = Field(None, gt=0, description="Token stages: tokens to draw over the run (a budget).")
    examples: int | None = Field(None, gt=0, description="Example stages: examples to draw over the run (a budget).")
    epochs: float | None = Field(None, gt=0, description="Passes over the source (a budget of epochs x its size).")
    max_epochs: float | None = Field(
        None, gt=0, description="Refuse a run that would pass over the source more often than this (a cap)."
    )

    @property
    def reader(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MixtureFields(BaseModel):
    """``data.sources`` and ``data.weights`` (a stage data section inherits these)."""

    sources: list[MixtureSource] = Field(
        default_factory=list,
        description="A weighted mixture of sources, each with its own reader; empty = the section's single source.",
    )
    weights: dict[str, float] = Field(
        default_factory=dict, description="Weights by source name, replacing the sources' own (sweeps, overrides)."
    )
    eval_loss: str = Field(
        "weighted",
        description="With sources: the held-out `loss` is the weighted mean of the sources' (weighted) or one "
        "source's, by name; every source's own is logged as eval/<name>/loss.",
    )

    #: The budget key of this stage's unit ("tokens" or "examples").
    budget_key: ClassVar[str] = "tokens"

    @model_validator(mode="after")
    def _check_mixture(self) -> MixtureFields:
        if self.sources:
            check_mixture(self.sources, self.weights, self.budget_key, self.eval_loss)
            self.source_configs()  # every source's reader is valid now, not when the stage starts
        elif self.weights:
            raise ValueError(f"data.weights names {sorted(self.weights)} but data.sources is empty")
        return self

    def source_configs(self, renames: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Each source's own data section: this section's settings, with the source's reader keys on top (a
        key the source does not give, e.g. a packed ``path`` the pipeline wires, is the section's)."""
        shared = self.model_dump(exclude={"sources", "weights", "eval_loss"}, exclude_unset=False)
        out: dict[str, Any] = {}
        for i, src in enumerate(self.sources):
            reader = {(renames or {}).get(k, k): v for k, v in src.reader.items()}
            try:
                out[src.name] = type(self).model_validate({**shared, **reader})
            except ValidationError as e:
                problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'reader'}: {x['msg']}" for x in e.errors())
                raise ValueError(f"data.sources[{i}] ({src.name!r}): {problems}") from None
        return out

    def eval_primary(self) -> str | None:
        """The source whose held-out loss is the stage's ``loss`` (None: the weighted mean)."""
        return None if self.eval_loss == "weighted" else self.eval_loss

    def mixture_weights(self) -> dict[str, MixtureSource]:
        """The sources with ``data.weights`` applied."""
        return {s.name: s.model_copy(update={"weight": self.weights.get(s.name, s.weight)}) for s in self.sources}


def check_mixture(sources: Sequence[MixtureSource], weights: Mapping[str, float], budget: str, eval_loss: str) -> None:
    """Bad mixtures, each named: duplicates, negative weights, all zero, a weight for a missing source, mixed forms."""
    names = [s.name for s in sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(
            f"data.sources names {', '.join(map(repr, dup))} more than once; give each source its own name"
        )
    missing = sorted(set(weights) - set(names))
    if missing:
        raise ValueError(
            f"data.weights names source(s) {', '.join(map(repr, missing))} not in data.sources "
            f"(have: {', '.join(names)})"
        )
    if eval_loss != "weighted" and eval_loss not in names:
        raise ValueError(f"data.eval_loss {eval_loss!r} is neither 'weighted' nor a source ({', '.join(names)})")
    other = "examples" if budget == "tokens" else "tokens"
    forms: dict[str, str] = {}
    for s in sources:
        if getattr(s, other) is not None:
            raise ValueError(
                f"data.sources {s.name!r}: `{other}` is a budget of the other kind of stage; use `{budget}`"
            )
        w = weights.get(s.name, s.weight)
        given = [k for k, v in (("weight", w), (budget, getattr(s, budget)), ("epochs", s.epochs)) if v is not None]
        if len(given) != 1:
            what = " and ".join(given) if given else "none"
            raise ValueError(f"data.sources {s.name!r}: set exactly one of weight, {budget} or epochs (got {what})")
        if w is not None and (not math.isfinite(w) or w < 0):
            raise ValueError(f"data.sources {s.name!r}: weight {w} is negative; weights are shares >= 0")
        forms[s.name] = "weight" if given[0] == "weight" else "budget"
    if len(set(forms.values())) > 1:
        w_names = [n for n, f in forms.items() if f == "weight"]
        raise ValueError(
            f"data.sources mixes weights ({', '.join(w_names)}) with budgets ({budget}/epochs: "
            f"{', '.join(n for n in forms if n not in w_names)}); use one form for every source"
        )
    if (
        all(forms[s.name] == "weight" for s in sources)
        and sum(weights.get(s.name, s.weight) or 0 for s in sources) == 0
    ):
        raise ValueError(f"data.sources: every weight is zero ({', '.join(names)}); give at least one a weight > 0")


def resolve_shares(sources: Mapping[str, MixtureSource], sizes: Mapping[str, float], budget: str) -> dict[str, float]:
    """Normalised shares of the stage's unit: weights as given, budgets (``tokens``/``examples``, or
    ``epochs`` x the source's size in that unit) relative to their sum."""
    raw: dict[str, float] = {}
    for name, s in sources.items():
        if s.weight is not None:
            raw[name] = float(s.weight)
        elif s.epochs is not None:
            raw[name] = s.epochs * float(sizes[name])
        else:
            raw[name] = float(getattr(s, budget))
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"data.sources: the shares sum to zero ({raw})")
    return {n: v / total for n, v in raw.items()}
