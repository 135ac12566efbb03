"""What the chat-data stages share (SFT and DPO): building their data, checking it before a run, sizing it.

Both read chat records with a tokenizer and its chat template (:class:`~llm_pipeline.data.config.ChatDataConfig`),
build every rank's sources the same way, refuse token ids beyond the model's vocabulary, and let
pre-flight build a sample to count what truncation ruins. The one difference is the unit: an SFT
example is one row, a DPO pair two (chosen and rejected).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from llm_pipeline.config import ModelConfig
from llm_pipeline.data.config import ChatDataConfig
from llm_pipeline.hardware import Check
from llm_pipeline.train.batching import BatchSource
from llm_pipeline.train.parallel import DistInfo
from llm_pipeline.train.stage import Stage
from llm_pipeline.train.stage_inputs import InputContext, MemoryPlan, source_check


class ChatStage(Stage):
    """A stage trained on chat data (``cfg.data`` is a ChatDataConfig); subclasses name their builder."""

    #: Rows one unit of the batch takes (an SFT example 1, a preference pair 2).
    rows_per_unit: ClassVar[int] = 1

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.data_report: dict[str, Any] = {}

    @property
    def data(self) -> ChatDataConfig:
        return self.cfg.data  # type: ignore[no-any-return]

    def data_builder(self) -> Callable[..., tuple[BatchSource, BatchSource | None, dict[str, Any]]]:
        """``build_sft_sources`` or ``build_preference_sources`` (same signature)."""
        raise NotImplementedError

    def encoding_tokenizer(self) -> Path:
        """The tokenizer folder (with its chat template) the records are encoded with."""
        raise NotImplementedError

    def build_data(self, info: DistInfo, tokenizer: Path) -> tuple[BatchSource, BatchSource | None]:
        """Every rank's train and validation sources; the builder's report is kept in ``data_report``.

        With ``data.sources``: one source per entry (each its own rejects file), mixed by example weight
        (:func:`~llm_pipeline.data.mixing.build_mixture`); the report holds each source's under ``sources``.
        """
        from llm_pipeline.data.chat_sources import mixture_rejects_path

        t = self.cfg.training

        def one(cfg: ChatDataConfig, rejects_name: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
            if rejects_name is not None:  # a mixture: each source its own rejects file
                path = mixture_rejects_path(cfg.rejects_path, t.output_dir, self.kind, rejects_name)
                cfg = cfg.model_copy(update={"rejects_path": str(path)})
            return self.data_builder()(
                cfg, tokenizer, micro_batch_size=t.micro_batch_size, rank=info.rank, world_size=info.world_size,
                seed=t.seed, output_dir=t.output_dir, show_progress=info.is_main,
            )  # fmt: skip

        if not self.data.sources:
            train, val, self.data_report = one(self.data)
            return train, val
        from llm_pipeline.data.mixing import build_mixture

        reports: dict[str, dict[str, Any]] = {}

        def build(name: str, cfg: ChatDataConfig) -> tuple[Any, Any]:
            if cfg.tokenizer_dir is not None and cfg.tokenizer_dir != self.data.tokenizer_dir:
                raise ValueError(
                    f"sets its own tokenizer_dir {cfg.tokenizer_dir}, but one mixture is encoded with one tokenizer "
                    f"({tokenizer}): set data.tokenizer_dir once for every source"
                )
            train, val, reports[name] = one(cfg, name)
            return train, val

        mixer, held_out = build_mixture(self.data, build, unit="examples", seed=t.seed, rank=info.rank)
        self.data_report = combine_reports(reports)
        return mixer, held_out

    def check_token_ids(self, top: int, model_cfg: ModelConfig, what: str) -> None:
        """Token ids beyond the embedding would crash deep inside the forward: one clear error instead."""
        if top >= model_cfg.vocab_size:
            raise ValueError(
                f"the {what} uses token id {top} but the model has vocab_size {model_cfg.vocab_size}: the tokenizer "
                f"({self.encoding_tokenizer()}) does not belong to model.init_from"
            )

    # ---- pre-flight ---------------------------------------------------------------------------

    def input_checks(self, ctx: InputContext) -> list[Check]:
        d = self.data
        out = super().input_checks(ctx)
        for label, src in (d.source_configs() if d.sources else {"": d}).items():
            what = f"data: {ctx.name}" + (f" ({label})" if label else "")
            out.append(source_check(what, src.kind, [*src.paths, *src.val_paths], src.name))
        if d.tokenizer_dir is not None:
            out.append(ctx.tokenizer(d.tokenizer_dir))
        return out

    def memory_plan(self, model_cfg: ModelConfig) -> MemoryPlan:
        unit = self.rows_per_unit
        return MemoryPlan(rows=self.cfg.training.micro_batch_size * unit, seq_len=self.data.max_seq_len, min_rows=unit)

    def data_quality(self, ctx: InputContext) -> Check | None:
        """Build a sample of the data as training would, and count what truncation ruins (a mixture: each
        source's sample; the worst source's check, named)."""
        if ctx.data_sample <= 0:
            return None
        if not self.data.sources:
            return self._data_quality(ctx, self.data, f"data quality: {ctx.name}")
        rank = {"ok": 0, "warn": 1, "BLOCKER": 2}
        checks = [
            self._data_quality(ctx, cfg, f"data quality: {ctx.name} ({n})")
            for n, cfg in self.data.source_configs().items()
        ]
        found = [c for c in checks if c is not None]
        return max(found, key=lambda c: rank.get(c.status, 0)) if found else None

    def _data_quality(self, ctx: InputContext, d: ChatDataConfig, name: str) -> Check | None:
        pairs = self.rows_per_unit == 2
        tok = d.tokenizer_dir or self.cfg.model.init_from
        via = ""
        if tok is None or not ctx.available(tok, "tokenizer.json"):
            hint = ctx.tokenizer_hint
            if hint is None or not (hint / "tokenizer.json").is_file():
                return Check(name, "warn", f"checked once the tokenizer exists ({tok or 'none configured'})")
            tok, via = hint, f"with the data step's tokenizer ({hint}; the stage's own comes later): "
        with tempfile.TemporaryDirectory(prefix="preflight-") as tmp:
            rejects = Path(tmp) / "rejects.jsonl"
            capped = min(ctx.data_sample, d.max_examples or ctx.data_sample)
            cfg = d.model_copy(update={"rejects_path": str(rejects), "max_examples": capped})
            try:
                _, _, report = self.data_builder()(cfg, tok, micro_batch_size=1, show_progress=False)
            except Exception as e:  # any reason the stage would fail to build its data is a blocker
                return Check(name, "BLOCKER", f"the stage could not build its data: {str(e).splitlines()[0]}")
            lines = [json.loads(x) for x in rejects.read_text(encoding="utf-8").splitlines() if x.strip()]
        truncated = [r for r in lines if r.get("reason") == "no_trained_tokens_after_truncation"
                     or (pairs and r.get("reason") == "no_trained_tokens")]  # fmt: skip
        identical = [r for r in lines if r.get("reason") == "identical_pair" and "truncation" in str(r.get("detail"))]
        seen = sum(int(report[s]["examples" if "examples" in report[s] else "pairs"]) for s in ("train", "val")
                   if s in report and isinstance(report[s], dict)) + len(lines)  # fmt: skip
        lost = len(truncated) + len(identical)
        what = f"{len(truncated)} record(s) with no trained token after truncation to {d.max_seq_len}"
        if pairs:
            what += f", {len(identical)} pair(s) identical after truncation"
        detail = f"{via}in the first {seen} records: {what}; {len(lines)} rejected in all {dict(report['rejected'])}"
        if lost == 0:
            return Check(name, "ok", detail)
        fix = "; raise data.max_seq_len" + (" or lower data.max_prompt_len" if pairs else "")
        return Check(name, "BLOCKER" if lost > 0.25 * max(seen, 1) else "warn", detail + fix)


def combine_reports(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One data report for a mixture: every source's own under ``sources``; ``train``/``val`` summed (counts)
    and averaged (ratios) over them; ``rejected`` summed by reason."""
    out: dict[str, Any] = {"sources": reports}
    rejected: dict[str, int] = {}
    for r in reports.values():
        for reason, n in r.get("rejected", {}).items():
            rejected[reason] = rejected.get(reason, 0) + n
    out["rejected"] = dict(sorted(rejected.items()))
    for split in ("train", "val"):
        parts = [r[split] for r in reports.values() if isinstance(r.get(split), dict)]
        if not parts:
            continue
        merged: dict[str, float] = {}
        for key in set.intersection(*(set(p) for p in parts)):
            values = [float(p[key]) for p in parts]
            ratio = key in ("packing_efficiency", "mean_examples_per_row", "batch_fill")
            merged[key] = sum(values) / len(values) if ratio else sum(values)
        out[split] = merged
    first = next(iter(reports.values()))
    out.update({k: first[k] for k in ("chat_template", "template_has_generation_blocks") if k in first})
    out["rejects_path"] = [r.get("rejects_path") for r in reports.values()]
    out["source"] = "mixture"
    return out
