"""What a run on a data mixture reports: per-source counts and realised shares, in logs and results.

Every step's metrics get ``mix/<source>/share`` (the realised share of the mixture's unit) and
``mix/<source>/tokens``, ``mix/<source>/examples`` (drawn so far), over all ranks since the run began
(the mixer's counters resume with its checkpointed state; a logged line averages its window); the run's
``TrainResult.stats`` (the pipeline's ``summary.json``, the report's mixture table) get each source's
rows, tokens, trained tokens, examples, passes, realised share and configured weight.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from llm_pipeline.train.parallel import all_reduce_max, all_reduce_sum
from llm_pipeline.train.trainer import Callback, Trainer, TrainResult

log = logging.getLogger(__name__)

_KEYS = ("rows", "tokens", "trained_tokens", "examples")


class MixtureReport(Callback):
    """Realised per-source counts and shares of a :class:`~llm_pipeline.data.mixing.WeightedMixture`."""

    def __init__(self) -> None:
        self.mixer: Any = None

    def on_train_start(self, trainer: Trainer) -> None:
        source = trainer.train_source
        self.mixer = source if hasattr(source, "shares") and hasattr(source, "counts") else None

    def global_counts(self, device: torch.device) -> dict[str, dict[str, float]]:
        """Per-source counts summed over all ranks (collective: every rank calls it)."""
        local = self.mixer.counts()
        names = list(local)
        flat = torch.tensor([[local[n][k] for k in _KEYS] for n in names], dtype=torch.float64, device=device)
        total = all_reduce_sum(flat).tolist()
        return {n: dict(zip(_KEYS, row, strict=True)) for n, row in zip(names, total, strict=True)}

    def summary(self, device: torch.device) -> dict[str, float]:
        from llm_pipeline.data.mixing import mixture_stats

        stats = mixture_stats(self.global_counts(device), self.mixer.shares, self.mixer.unit)
        # passes: the most any rank has made over its part of a source (the counts above are sums over ranks)
        passes = self.mixer.passes()
        most = all_reduce_max(torch.tensor([float(passes[n]) for n in self.mixer.names], dtype=torch.float64,
                                           device=device)).tolist()  # fmt: skip
        stats.update({f"mix/{n}/passes": p for n, p in zip(self.mixer.names, most, strict=True)})
        return stats

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        if self.mixer is None:
            return
        stats = self.summary(trainer.device)
        metrics.update({k: v for k, v in stats.items() if k.endswith(("/share", "/tokens", "/examples"))})

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if self.mixer is None:
            return
        stats = self.summary(trainer.device)
        result.stats.update(stats)
        if trainer.info.is_main:
            log.info(
                "data mixture (%s): %s", self.mixer.unit,
                ", ".join(f"{n} {stats[f'mix/{n}/share']:.3f} (weight {stats[f'mix/{n}/weight']:.3f}, "
                          f"{stats[f'mix/{n}/tokens']:,.0f} tokens, {stats[f'mix/{n}/examples']:,.0f} examples)"
                          for n in self.mixer.names),
            )  # fmt: skip


def check_mixture_plan(cfg: Any, train_source: Any, info: Any) -> None:
    """A mixture's planned passes over each source, checked against its ``max_epochs`` and logged, once the
    run's length is known (``training.max_steps``, or the one ``num_epochs`` set): every stage, every way of
    setting that length, before anything trains. Not a mixture: nothing to check."""
    from llm_pipeline.data.mixing import WeightedMixture, check_planned_epochs

    if not isinstance(train_source, WeightedMixture):
        return
    t = cfg.training
    # one step in the mixture's own count: tokens (token streams) or rows (SFT rows, DPO pairs, LoRA chat rows)
    step = t.global_batch_tokens if cfg.batch_unit == "tokens" else t.global_batch_size
    if step is None:
        return
    check_planned_epochs(train_source, float(step) * t.max_steps, info.rank, step=float(step), num_epochs=t.num_epochs)


def mixture_callbacks(train_source: Any) -> list[Callback]:
    """The report callbacks a run's train source needs (a mixture: :class:`MixtureReport`)."""
    return [MixtureReport()] if hasattr(train_source, "shares") and hasattr(train_source, "counts") else []
