"""Validation during training: the mean loss (and the objective's metrics) over the same batches every time.

Each source is rewound to the state it had when the run was set up, so every evaluation of a run
sees the same rows and the curve compares like with like. Extra sources (e.g. a fine-tuning stage's
general data, to watch forgetting as it happens) are logged as ``<name>_loss``/``<name>_ppl``.

A data mixture's held-out sets (a :class:`~llm_pipeline.data.mixing.SourceSet` as the validation
source) are evaluated one by one and logged as ``<source>/loss``, ``<source>/ppl``, ... (in the
trackers ``eval/<source>/loss``), so a user sees which part of the mixture a change helps or hurts;
the plain ``loss`` (and every other metric) is the mixture-weighted mean of theirs, or one source's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from llm_pipeline.data.mixing import SourceSet
from llm_pipeline.train.batching import Batching, BatchSource, StepPlan
from llm_pipeline.train.objectives import Objective
from llm_pipeline.train.parallel import all_reduce_sum, any_rank


class Evaluator:
    """Evaluates ``model`` on ``val_source`` (and ``extra_sources``) every ``eval_steps`` optimizer steps.

    At most ``eval_batches`` micro-batches per source; a finite source (one pass over held-out
    examples) may end sooner by raising ``StopIteration`` on every rank after the same number of batches.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        objective: Objective,
        batching: Batching,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager],
        val_source: BatchSource | None,
        extra_sources: Mapping[str, BatchSource] | None,
        eval_steps: int,
        eval_batches: int,
    ) -> None:
        self.model, self.objective, self.batching = model, objective, batching
        self.device, self.autocast = device, autocast
        self.every, self.batches = eval_steps, eval_batches
        self._sources: dict[str, tuple[BatchSource, dict[str, Any]]] = {}
        self._mixture: tuple[dict[str, float], str | None] | None = None
        self._combine: Callable[..., dict[str, float]] | None = None
        if isinstance(val_source, SourceSet):  # a mixture's held-out sets: "<name>/" + metric each, `loss` combined
            self._mixture = (dict(val_source.shares), val_source.primary)
            self._combine = val_source.combine
            for name, src in val_source.sources.items():
                self._sources[f"{name}/"] = (src, src.state_dict())
        elif val_source is not None:
            self._sources[""] = (val_source, val_source.state_dict())
        for name, src in (extra_sources or {}).items():
            self._sources[name] = (src, src.state_dict())

    @property
    def enabled(self) -> bool:
        return ("" in self._sources or self._mixture is not None) and bool(self.every)

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    @torch.no_grad()
    def evaluate(self, plan: StepPlan) -> dict[str, float]:
        """Every source's metrics at the training plan's shape: ``loss`` (and ``ppl``), ``<name>_loss``..."""
        result: dict[str, float] = {}
        per_source: dict[str, dict[str, float]] = {}
        units: dict[str, float] = {}
        for name, (source, start) in self._sources.items():
            metrics, n = self._evaluate_source(source, start, plan)
            if name.endswith("/"):
                per_source[name[:-1]], units[name[:-1]] = metrics, n
                result.update({f"{name}{k}": v for k, v in metrics.items()})
            else:
                result.update({f"{name}_{k}" if name else k: v for k, v in metrics.items()})
        if self._combine is not None:
            result.update(self._combine(per_source, units))
        elif self._mixture is not None:
            result.update(combine_sources(per_source, *self._mixture))
        return result

    def _evaluate_source(
        self, source: BatchSource, start: dict[str, Any], plan: StepPlan
    ) -> tuple[dict[str, float], float]:
        """Its metrics, and the loss units they are means over (all ranks)."""
        source.load_state_dict(start)
        self.batching.apply(source, plan)
        self.model.eval()
        sums = torch.zeros(2, device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        try:
            for _ in range(self.batches):
                try:
                    cpu = source.next_batch()
                    ended = False
                except StopIteration:
                    ended = True
                if any_rank(ended, self.device):
                    break
                batch = {k: v.to(self.device, non_blocking=True) for k, v in cpu.items()}
                with self.autocast():
                    out = self.objective(self.model, batch)
                sums[0] += out.loss_sum.float()
                sums[1] += self.objective.count(batch)
                for k, v in out.metric_sums.items():
                    metric_sums[k] = metric_sums.get(k, 0) + v.float()
        finally:
            self.model.train()
        packed = all_reduce_sum(torch.stack([sums[0], sums[1], *metric_sums.values()]))
        units = max(float(packed[1]), 1.0)
        result = {"loss": float(packed[0]) / units}
        result.update({k: float(v) / units for k, v in zip(metric_sums, packed[2:], strict=True)})
        key = self.objective.perplexity_of
        if key is not None and key in result:
            result["loss"] = result[key]
            result["ppl"] = math.exp(min(result[key], 50.0))
        return result, float(packed[1])


def combine_sources(per_source: Mapping[str, Mapping[str, float]], shares: Mapping[str, float], primary: str | None
                    ) -> dict[str, float]:  # fmt: skip
    """A mixture's overall held-out metrics: one source's (``primary``), or the share-weighted mean over the
    sources of every metric they all have (``ppl`` is the exp of the weighted loss, not a mean of ppls)."""
    if primary is not None:
        return dict(per_source[primary])
    weights = {n: shares.get(n, 0.0) for n in per_source}
    if sum(weights.values()) <= 0:  # only zero-share sources are held out: an even mean
        weights = dict.fromkeys(per_source, 1.0)
    total = sum(weights.values())
    keys = set.intersection(*(set(m) for m in per_source.values())) - {"ppl"}
    out = {k: sum(weights[n] * per_source[n][k] for n in per_source) / total for k in sorted(keys)}
    if "loss" in out and all("ppl" in m for m in per_source.values()):
        out["ppl"] = math.exp(min(out["loss"], 50.0))
    return out
