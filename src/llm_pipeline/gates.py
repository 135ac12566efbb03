"""Promotion gates: a pure function of (metrics, baseline, thresholds) -> verdict.

A stage's model is promoted only when every rule of its gate holds. Rules name a metric by its
dotted path in an evaluation's ``results.json`` (e.g. ``perplexity.perplexity``) and bound it
absolutely (``min``/``max``) or against the previous stage's value (``max_regression``, an
allowed worsening in the metric's own units, or ``max_regression_pct``), or against another metric
of the same results (``baseline_metric``, e.g. a stage's held-out score before its first step). A
metric that is missing or whose evaluation timed out fails its rule: an absent number never passes a
gate. A partial result (computed on part of its data) counts as missing unless the rule sets
``allow_partial``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from llm_pipeline.config import StrictModel, load_config
from llm_pipeline.eval.results import EvalResults
from llm_pipeline.records import RuleResult, Verdict

#: ``baseline_stage: previous``: the model the gated stage started from, resolved by the pipeline.
PREVIOUS = "previous"


class GateRule(StrictModel):
    """Bounds on one metric; at least one bound must be given."""

    metric: str = Field(description="dotted path in results.json, e.g. mmlu.accuracy")
    min: float | None = Field(None, description="metric must be >= this")
    max: float | None = Field(None, description="metric must be <= this")
    higher_is_better: bool = Field(True, description="direction used for regression checks")
    max_regression: float | None = Field(
        None, description="allowed worsening vs the baseline, absolute (negative: must improve by at least this)"
    )
    max_regression_pct: float | None = Field(
        None, description="allowed worsening vs the baseline, percent (negative: must improve by at least this)"
    )
    baseline_metric: str | None = Field(
        None,
        description="compare against this metric of the stage's own results instead of the same metric of "
        "baseline_stage's (e.g. stage.start.ppl: the stage's held-out data scored before its first step)",
    )
    allow_partial: bool = Field(
        False,
        description="accept a result computed on part of its data (status 'partial', e.g. HumanEval samples "
        "covering only some problems); by default a partial result counts as missing",
    )

    @model_validator(mode="after")
    def _has_bound(self) -> GateRule:
        bounds = (self.min, self.max, self.max_regression, self.max_regression_pct)
        if all(b is None for b in bounds):
            raise ValueError(f"rule for {self.metric!r} sets no bound (min, max, max_regression, max_regression_pct)")
        if self.baseline_metric is not None and self.max_regression is None and self.max_regression_pct is None:
            raise ValueError(
                f"rule for {self.metric!r}: baseline_metric is compared through max_regression or "
                "max_regression_pct; set one of them (with min/max alone it would be ignored)"
            )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"rule for {self.metric!r}: min {self.min} > max {self.max}")
        return self


class StageGate(StrictModel):
    """The rules a stage's model must pass before the next stage starts from it."""

    baseline_stage: str | None = Field(
        None,
        description="stage whose results (<evals>/<stage>_final) are the regression baseline; 'previous' = the "
        "model this stage started from in the pipeline (the stage before it, or init for the first)",
    )
    rules: list[GateRule] = Field(min_length=1, description="all must hold; a gate without rules is a mistake")


class GatesConfig(StrictModel):
    """``configs/promotion_gates.yaml``: one gate per stage name."""

    stages: dict[str, StageGate]


def flatten_metrics(results: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested results -> {"a.b.c": value}; non-numeric leaves (e.g. status strings) are kept."""
    flat: dict[str, Any] = {}
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_metrics(v, key + "."))
        else:
            flat[key] = v
    return flat


def _lookup(metrics: Mapping[str, Any], name: str, *, allow_partial: bool = False) -> tuple[float | None, str | None]:
    """A metric's value, or why there is none (missing, timed out, partial, not a number)."""
    section = name.split(".", 1)[0]
    status = metrics.get(f"{section}.status")
    accepted = ("ok", "completed", "success", "partial") if allow_partial else ("ok", "completed", "success")
    if isinstance(status, str) and status not in accepted:
        if status == "partial":
            cov = metrics.get(f"{section}.coverage")
            share = f" ({cov:.1%} coverage)" if isinstance(cov, int | float) and not isinstance(cov, bool) else ""
            return None, f"evaluation '{section}' is partial{share}; set allow_partial on the rule to accept it"
        return None, f"evaluation '{section}' {status.replace('_', ' ')}"
    if name not in metrics:
        return None, "metric missing from the results"
    value = metrics[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None, f"not a finite number ({value!r})"
    return float(value), None


def evaluate_gate(
    stage: str,
    gate: StageGate,
    metrics: Mapping[str, Any],
    baseline: Mapping[str, Any] | None = None,
    baseline_name: str = "baseline",
) -> Verdict:
    """Check every rule; pure, no I/O. ``metrics``/``baseline`` are flat dotted mappings; ``baseline_name``
    says in messages and records what the baseline is (e.g. ``sft_final``)."""
    out: list[RuleResult] = []
    for rule in gate.rules:
        value, why = _lookup(metrics, rule.metric, allow_partial=rule.allow_partial)
        if value is None:
            out.append(RuleResult(metric=rule.metric, passed=False, value=None, reason=why or "missing"))
            continue
        failures: list[str] = []
        base, label = None, None
        if rule.min is not None and value < rule.min:
            failures.append(f"{value:.4g} < min {rule.min:.4g}")
        if rule.max is not None and value > rule.max:
            failures.append(f"{value:.4g} > max {rule.max:.4g}")
        if rule.max_regression is not None or rule.max_regression_pct is not None:
            against = metrics if rule.baseline_metric else (baseline or {})
            base, base_why = _lookup(against, rule.baseline_metric or rule.metric, allow_partial=rule.allow_partial)
            label = rule.baseline_metric or baseline_name
            if base is None:
                failures.append(f"no {label} value ({base_why})")
            else:
                worse = (base - value) if rule.higher_is_better else (value - base)
                if rule.max_regression is not None and worse > rule.max_regression:
                    failures.append(
                        f"regressed by {worse:.4g} vs {label} {base:.4g} (allowed {rule.max_regression:.4g})"
                    )
                if rule.max_regression_pct is not None and base == 0:
                    failures.append("percent change undefined against a baseline of 0; use max_regression")
                elif rule.max_regression_pct is not None:
                    pct = 100.0 * worse / abs(base)
                    if pct > rule.max_regression_pct:
                        failures.append(
                            f"regressed by {pct:.2f}% vs {label} {base:.4g} (allowed {rule.max_regression_pct:g}%)"
                        )
        out.append(
            RuleResult(
                metric=rule.metric,
                passed=not failures,
                value=value,
                reason="; ".join(failures) or "ok",
                baseline=base,
                baseline_of=label,
            )
        )
    return Verdict(stage=stage, passed=all(r.passed for r in out), results=out)


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Flat metrics from an evaluation ``results.json`` (or a directory holding one)."""
    return flatten_metrics(EvalResults.load(path).metrics)


def check_gate(
    stage: str,
    results: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str],
    baseline: str | os.PathLike[str] | None = None,
    baseline_stage: str | None = None,
) -> Verdict:
    """Load the gate config and results files, then :func:`evaluate_gate`. ``baseline_stage`` is the gate's
    ``baseline_stage`` as the pipeline resolved it (``previous`` -> the stage this one started from); a
    gate with ``previous`` needs it, or an explicit ``baseline`` results path."""
    cfg = load_config(GatesConfig, config)
    if stage not in cfg.stages:
        raise ValueError(f"{config}: no gate for stage {stage!r}; defined: {', '.join(sorted(cfg.stages))}")
    gate = cfg.stages[stage]
    needs_baseline = any(
        (r.max_regression is not None or r.max_regression_pct is not None) and r.baseline_metric is None
        for r in gate.rules
    )
    named = baseline_stage or gate.baseline_stage
    if baseline is None and needs_baseline and named == PREVIOUS:
        raise ValueError(
            f"gate {stage!r}: baseline_stage 'previous' is the model the stage started from, which only its "
            "pipeline knows: check it from the run (--run-dir, which reads pipeline.resolved.yaml) or pass "
            "--baseline RESULTS"
        )
    if baseline is None and needs_baseline and named:
        folder = Path(results) if Path(results).is_dir() else Path(results).parent  # results.json or its folder
        baseline = folder.parent / f"{named}_final"
    metrics = load_results(results)  # the stage's own results first: their problem is the one to report
    name = Path(baseline).name if baseline is not None else "baseline"
    base = None
    if baseline is not None and needs_baseline:
        try:
            base = load_results(baseline)
        except FileNotFoundError:  # never evaluated (or removed): its rules fail, the gate blocks, it says why
            base, name = {}, f"{name} (baseline stage {named or '?'} has no results.json in {baseline})"
    return evaluate_gate(stage, gate, metrics, base, name)
