"""The pipeline behind ``llm-pipeline run`` / ``make demo``: data, then gated training stages.

data -> for each stage in ``stages``: train -> evaluate -> promotion gate -> the next stage starts
from this one's promoted export -> ... -> generate from the last promoted model.

A stage entry names its kind (``pretrain``, ``sft``, ``dpo``, ``lora``: see
:data:`llm_pipeline.train.stage.STAGE_KINDS`), its own config file (the same file the single
command takes), what it starts from, its evaluation and its gate. The pipeline only wires paths
under ``run_dir``: adding a stage is a config entry, not code here.

Re-running the same command is always safe and cheap:

- an interrupted stage resumes from its newest checkpoint (every stage runs with ``auto`` resume); a stage
  whose start model or packed data changed since its checkpoints were written, or a finished stage whose
  config changed in a setting a resume cannot apply, trains again (the old checkpoints and logs are kept,
  renamed ``<name>.replaced-<time>``);
- a finished stage whose fingerprint (its resolved config, the model it starts from, the data) is
  unchanged and whose export is still in place is skipped, and so is an evaluation whose model and
  config are unchanged; gates are re-checked (they are pure functions of the results);
- ``--from STAGE`` starts at that stage (earlier ones are taken as they are recorded), ``--only
  STAGE`` runs just that one.

A passed gate writes ``promoted/<stage>.json``, which vouches for the export by content; a blocked gate
stops the run (exit 3) naming each failed rule, by how much, and the baseline it was compared with. A
stage trained again while it has an export writes a candidate (``<stage>_final_candidate``) that takes
the export's place only once its gate passes: a promoted model is never overwritten before its gate.
``summary.json`` records every step (fingerprints, wall time, exports, evaluations, verdicts: the typed
records of :mod:`llm_pipeline.records`) and is what ``llm-pipeline report`` reads.

One run per run folder: the run folder's lock is taken before anything is read or written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llm_pipeline.checkpoint.lock import TOKEN_ENV, FolderLock, FolderLocked, live_owner
from llm_pipeline.config import StrictModel, config_to_dict, load_config, save_config
from llm_pipeline.hashing import file_sha256, short_hash
from llm_pipeline.records import (
    EvalRecord,
    InitRecord,
    Promotion,
    StageRecord,
    cached_fingerprint,
    folder_stat,
    load_summary,
    promotion_path,
    read_promotion,
    resolve_in_run,
    save_summary,
    write_promotion,
)
from llm_pipeline.train.stage import STAGE_KINDS, WiringContext, stage_class

log = logging.getLogger(__name__)
CANDIDATE = "_candidate"  # <stage>_final_candidate: a retrained export awaiting its gate


class StageRef(StrictModel):
    """A step run from its own config file, with overrides; outputs are placed under run_dir."""

    config: Path = Field(description="the step's YAML config")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides, as with --set")


class StageEntry(StageRef):
    """One training stage of the pipeline."""

    name: str = Field(description="unique name: checkpoints/<name>, evals/<name>_final, promoted/<name>.json")
    kind: str = Field(description=f"stage kind: one of {', '.join(STAGE_KINDS)}")
    start_from: Literal["config", "previous"] | Path = Field(
        "previous",
        description="'previous' = the last promoted stage's export; 'config' = the stage config's own model "
        "section (a preset's random init or its init_from); or an HF model directory",
    )
    nproc_per_node: int = Field(1, ge=1, description="processes (GPUs) on this node; >1 launches torchrun")
    evaluate: bool = Field(True, description="run the eval suite on the stage's export")
    eval_set: list[str] = Field(
        default_factory=list, description="KEY=VALUE overrides of the eval config for this stage only"
    )
    gate: str | None = Field(None, description="gate name in the gates file (usually the stage name); null = none")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        if v not in STAGE_KINDS:
            raise ValueError(f"unknown stage kind {v!r}; choose one of: {', '.join(STAGE_KINDS)}")
        return v


class GenerateStage(StrictModel):
    """Sample completions from the final model: a human-readable smoke test of the whole run."""

    prompts: list[str] = Field(default_factory=lambda: ["def "], description="prompt texts")
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens (0 = all)")
    seed: int = Field(0, description="sampling seed")


class PipelineConfig(StrictModel):
    """Which stages run, with which configs, under which folder."""

    run_dir: Path = Field(Path("runs/demo"), description="everything the run writes goes here")
    data: StageRef | None = Field(None, description="data prepare: download, clean, tokenizer, pack")
    eval: StageRef | None = Field(None, description="evaluation config applied to each stage's export")
    evaluate_start: bool = Field(
        True, description="evaluate the first stage's starting model too (evals/init_final), as the first baseline"
    )
    gates: Path | None = Field(None, description="promotion gates config; a blocked gate stops the pipeline")
    stages: list[StageEntry] = Field(default_factory=list, description="training stages, in order")
    generate: GenerateStage | None = None
    report: bool = Field(True, description="write report/report.html and report/summary.md after the run")

    @model_validator(mode="after")
    def _check_stages(self) -> PipelineConfig:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dupes)}")
        if "data" in names or "init" in names:
            raise ValueError("'data' and 'init' are reserved step names; rename the stage")
        if self.stages and self.stages[0].start_from == "previous":
            raise ValueError(
                f"the first stage ({self.stages[0].name}) has no previous stage to start from: "
                "set its start_from to 'config' or a model directory"
            )
        return self

    def step_names(self) -> list[str]:
        return (["data"] if self.data is not None else []) + [s.name for s in self.stages]


class GateBlocked(RuntimeError):
    """A promotion gate failed: later stages must not start from this model."""


class StageStopped(RuntimeError):
    """A stage stopped before finishing (signal, divergence); its checkpoint is saved."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Run:
    """One invocation of the pipeline: its config, the selected steps and the summary being written."""

    def __init__(
        self, cfg: PipelineConfig, *, start: str | None, only: str | None, lock_token: str = "", ranks: Any = None
    ) -> None:
        self.cfg = cfg
        self.ranks: _Ranks | None = ranks  # launched by torchrun on several ranks: they train with this one
        self.run_dir = cfg.run_dir
        self.lock_token = lock_token  # handed to torchrun workers, so they may lock their stage folder inside ours
        names = cfg.step_names()
        for flag, value in (("--from", start), ("--only", only)):
            if value is not None and value not in names:
                raise ValueError(f"{flag} {value}: no such step; the steps are {', '.join(names)}")
        if only is not None:
            self.selected = {only}
        elif start is not None:
            self.selected = set(names[names.index(start) :])
        else:
            self.selected = set(names)
        self.summary = load_summary(self.run_dir)
        self.summary.run_dir = str(self.run_dir)
        self.packed_dir: Path | None = None
        self.tokenizer_dir: Path | None = None
        self.data_fp: str | None = None
        # Standard-library modules no stdlib source of this run has trained on so far (None: no such source):
        # what chat_format may ask about (functions never trained on).
        self.held_out: set[str] | None = None

    def hold_out(self, cfg: Any) -> None:
        """Narrow :attr:`held_out` to what ``cfg`` (the data step's or a stage's config) also keeps out."""
        from llm_pipeline.data.config import stdlib_held_out_modules

        mods = stdlib_held_out_modules(cfg)
        if mods is not None:
            self.held_out = mods if self.held_out is None else self.held_out & mods

    def save(self) -> None:
        save_summary(self.run_dir, self.summary)

    def fp(self, path: Path | str | None) -> str | None:
        """An export folder's content fingerprint (re-hashed only when its files changed since the last run)."""
        return cached_fingerprint(Path(path), self.summary.fingerprints) if path not in (None, "") else None

    def final_dir(self, name: str, *, candidate: bool = False) -> Path:
        return self.run_dir / "checkpoints" / (f"{name}_final{CANDIDATE}" if candidate else f"{name}_final")

    # ---- data ----------------------------------------------------------------------------------

    def data(self) -> None:
        if self.cfg.data is None:
            return
        from llm_pipeline.data.config import DataConfig
        from llm_pipeline.data.manifest import MANIFEST
        from llm_pipeline.data.prepare import prepare

        data_cfg = load_config(
            DataConfig, self.cfg.data.config, self.cfg.data.set, output_dir=str(self.run_dir / "data")
        )
        if "data" in self.selected:
            self.summary.data = prepare(data_cfg)
        elif not (data_cfg.packed_dir / MANIFEST).is_file():
            raise FileNotFoundError(
                f"{data_cfg.packed_dir}: no packed data yet; run the pipeline without --from/--only"
            )
        self.packed_dir, self.tokenizer_dir = data_cfg.packed_dir, data_cfg.tokenizer_dir
        self.data_fp = file_sha256(data_cfg.packed_dir / MANIFEST)[:16]
        self.hold_out(data_cfg)

    def eval_overrides(self) -> dict[str, str]:
        return {"perplexity.packed_data": str(self.packed_dir)} if self.packed_dir else {}

    def chat_format_modules(self, eval_cfg: Any) -> dict[str, list[str]]:
        """The override that makes ``chat_format`` ask about the modules this run's stdlib sources held out
        (when it does not name its own); a warning when it names modules one of them trains on (its
        answer_f1 would measure memorisation there)."""
        if "chat_format" not in eval_cfg.tasks or self.held_out is None:
            return {}
        named = eval_cfg.section("chat_format").held_out_modules
        if named is None:
            return {"chat_format.held_out_modules": sorted(self.held_out)}
        if trained := sorted(set(named) - self.held_out):
            log.warning(
                "chat_format.held_out_modules names %s, which this run's data trains on (held out by every stdlib "
                "source: %s): its answer_f1 measures memorisation there; leave it unset to follow the data",
                ", ".join(trained),
                ", ".join(sorted(self.held_out)) or "none",
            )
        return {}

    # ---- evaluation and gates --------------------------------------------------------------------

    def evaluate(
        self, model_dir: Path, name: str, model_fp: str | None, extra: list[str], stage_logs: Path | None
    ) -> dict[str, Any]:
        """Run the eval suite on ``model_dir`` unless the same model and config were already scored."""
        from llm_pipeline.eval.config import EvalConfig
        from llm_pipeline.eval.results import EvalResults
        from llm_pipeline.eval.runner import run_evals

        assert self.cfg.eval is not None
        eval_cfg = load_config(EvalConfig, self.cfg.eval.config, [*self.cfg.eval.set, *extra], **self.eval_overrides())
        if held_out := self.chat_format_modules(eval_cfg):
            eval_cfg = load_config(EvalConfig, self.cfg.eval.config, [*self.cfg.eval.set, *extra],
                                   **self.eval_overrides(), **held_out)  # fmt: skip
        out = self.run_dir / "evals" / name
        results_file = out / "results.json"
        eval_fp = short_hash([config_to_dict(eval_cfg), model_fp, self.data_fp])
        record = self.summary.evals.get(name) or EvalRecord()
        if record.fingerprint == eval_fp and results_file.is_file():
            log.info("eval %s: up to date (%s), skipped", name, results_file)
            return EvalResults.load(results_file).metrics
        results = run_evals(model_dir, eval_cfg, output=out)
        stage_metrics = _last_eval_metrics(stage_logs) if stage_logs is not None else {}
        if stage_metrics:
            # The stage's own held-out metrics (SFT loss, DPO reward accuracy...) next to the suite's, for gates.
            results.metrics["stage"] = stage_metrics
            results.save(results_file)
        self.summary.evals[name] = EvalRecord(fingerprint=eval_fp, results=str(results_file))
        log.info("eval %s -> %s", name, results_file)
        return results.metrics

    def gate(self, entry: StageEntry, record: StageRecord) -> None:
        from llm_pipeline.gates import GatesConfig, check_gate

        assert self.cfg.gates is not None and entry.gate is not None and record.eval_dir is not None
        gates = load_config(GatesConfig, self.cfg.gates)
        baseline = gate_baseline(self.cfg, entry, gates.stages[entry.gate].baseline_stage)
        verdict = check_gate(entry.gate, Path(record.eval_dir), config=self.cfg.gates, baseline_stage=baseline)
        record.gate = verdict
        if not verdict.passed:
            record.status = "blocked"
            promoted, problem = read_promotion(self.run_dir, entry.name)
            final = self.final_dir(entry.name)
            if Path(record.final_dir or "") != final:
                kept = (
                    f"\nThe promoted model stays {promoted.model_dir} (promoted/{entry.name}.json); the blocked "
                    f"candidate is at {record.final_dir}."
                    if promoted is not None and problem is None
                    else f"\nThe blocked candidate is at {record.final_dir}."
                )
            else:
                # The stage's own export failed its gate: no promotion of this stage holds any more.
                promotion_path(self.run_dir, entry.name).unlink(missing_ok=True)
                kept = ""
            self.save()
            against = f" (baseline: {baseline}, evals/{baseline}_final)" if baseline else ""
            failed = [f"{r.metric} = {_fmt(r.value)}: {r.reason}" for r in verdict.failed()]
            raise GateBlocked(f"{entry.name} gate blocked promotion{against}:\n  " + "\n  ".join(failed) + kept)
        log.info("%s gate: passed", entry.name)

    def promote(self, entry: StageEntry, record: StageRecord) -> None:
        """Point ``promoted/<stage>.json`` at the stage's export, by content; a candidate that passed its gate
        first takes the place of the previously promoted export (which is kept, renamed)."""
        final = self.final_dir(entry.name)
        if Path(record.final_dir or "") != final:
            self._swap_in(entry.name, record)
        pointer = Promotion(
            stage=entry.name,
            model_dir=str(final),
            gate=record.gate,
            fingerprint=record.output_fingerprint,
            stat=folder_stat(final),
            start_fingerprint=record.start_fingerprint,
        )
        write_promotion(self.run_dir, pointer)
        record.status = "promoted"

    def _swap_in(self, name: str, record: StageRecord) -> None:
        """Move a passed candidate's exports and evaluation to the stage's own names; what they replace is kept
        beside them as ``<name>.replaced-<time>`` (later stages' promoted models were trained from it)."""
        candidate = f"{name}_final{CANDIDATE}"
        moves = [(Path(p), Path(p).with_name(Path(p).name.replace(candidate, f"{name}_final", 1)))
                 for p in record.exports.values()]  # fmt: skip
        if record.eval_dir:
            moves.append((Path(record.eval_dir), self.run_dir / "evals" / f"{name}_final"))
        for src, dst in moves:
            if src == dst or not src.exists():
                continue
            if dst.exists():
                aside = _free_name(dst)
                dst.rename(aside)
                log.warning("%s: %s (the previously promoted model's) is kept as %s; delete it when not needed",
                            name, dst, aside)  # fmt: skip
            src.rename(dst)
            if (known := self.summary.fingerprints.pop(str(src), None)) is not None:
                self.summary.fingerprints[str(dst)] = known  # same files, sizes and times: no need to hash again
        record.exports = {k: str(dst) for (k, _), (_, dst) in zip(record.exports.items(), moves, strict=False)}
        record.final_dir = str(self.final_dir(name))
        if record.eval_dir:
            evals = self.summary.evals.pop(Path(record.eval_dir).name, None)
            record.eval_dir = str(self.run_dir / "evals" / f"{name}_final")
            if evals is not None:
                evals.results = str(Path(record.eval_dir) / "results.json")
                self.summary.evals[f"{name}_final"] = evals
        record.output_fingerprint = self.fp(record.final_dir)
        self.save()

    # ---- stages ----------------------------------------------------------------------------------

    def promoted(self, name: str) -> tuple[Path, str | None] | None:
        """The stage's promoted export and its fingerprint, when ``promoted/<name>.json`` still vouches for it."""
        pointer, problem = read_promotion(self.run_dir, name)
        if pointer is None or problem is not None:
            if problem:
                log.warning("promoted/%s.json no longer holds: %s", name, problem)
            return None
        model_dir = resolve_in_run(self.run_dir, pointer.model_dir)
        return model_dir, self.fp(model_dir)

    def stages(self) -> None:
        previous: tuple[Path, str | None] | None = None  # the last promoted export and its fingerprint
        sample_from = None  # the last stage this run selected (not a later one recorded by an earlier run)
        for i, entry in enumerate(self.cfg.stages):
            if entry.name not in self.selected:
                # Taken as recorded: a later selected stage starts from its promoted export, if any.
                previous = self.promoted(entry.name)
                continue
            previous = sample_from = self.stage(i, entry, previous)
        self.generate(sample_from[0] if sample_from else None)

    def _recorded_export(self, name: str, record: StageRecord) -> Path | None:
        """The export ``record`` describes, still in place with the content it recorded (None: gone or changed)."""
        if not record.output_fingerprint:
            return None
        # its own folder, or the stage's final one (a candidate moved there by a promotion cut short)
        for path in dict.fromkeys([*([Path(record.final_dir)] if record.final_dir else []), self.final_dir(name)]):
            if folder_stat(path) == record.output_fingerprint:  # recorded before content fingerprints (file times)
                record.output_fingerprint = self.fp(path)
            if self.fp(path) == record.output_fingerprint:
                if str(path) != record.final_dir:
                    log.warning("stage %s: its export was found at %s (a promotion cut short); adopted", name, path)
                    moved = {k: str(path.with_name(Path(v).name.replace(Path(record.final_dir or "").name,
                                                                         path.name, 1)))
                             for k, v in record.exports.items()}  # fmt: skip
                    record.final_dir, record.exports = str(path), moved
                return path
        return None

    def stage(self, i: int, entry: StageEntry, previous: tuple[Path, str | None] | None) -> tuple[Path, str | None]:
        cls = stage_class(entry.kind)
        if entry.start_from == "previous":
            if previous is None:
                raise FileNotFoundError(
                    f"stage {entry.name} starts from the previous stage's promoted model, and there is none "
                    f"(run the earlier stages first, or set start_from)"
                )
            start_dir, start_fp = previous
        elif entry.start_from == "config":
            start_dir, start_fp = None, None
        else:
            start_dir = Path(entry.start_from)
            if not (start_dir / "config.json").is_file():
                raise FileNotFoundError(f"stage {entry.name}: start_from {start_dir} is not a model directory")
            start_fp = self.fp(start_dir)
        ctx = WiringContext(self.run_dir, entry.name, start_dir, self.packed_dir, self.tokenizer_dir)
        wiring: dict[str, Any] = {
            "training.output_dir": str(self.run_dir / "checkpoints" / entry.name),
            "training.final_dir": str(self.final_dir(entry.name)),
            "training.logging_dir": str(self.run_dir / "logs" / entry.name),
            "training.resume_from_checkpoint": "auto",
            **cls.pipeline_wiring(ctx),
        }
        if start_dir is not None:
            wiring |= {"model.init_from": str(start_dir), "model.overrides": {}}
        stage_cfg = load_config(cls.config_class, entry.config, entry.set, **wiring)
        self.hold_out(stage_cfg)
        if i == 0 and self.cfg.eval is not None and self.cfg.evaluate_start:
            init_dir, start_fp = self.start_model(cls, stage_cfg, start_dir, start_fp)
            wiring |= {"model.init_from": str(init_dir), "model.overrides": {}}
            stage_cfg = load_config(cls.config_class, entry.config, entry.set, **wiring)
        stage_fp = short_hash([config_to_dict(stage_cfg), start_fp, self.data_fp, entry.nproc_per_node])
        old = self.summary.stages.get(entry.name) or StageRecord()
        export = self._recorded_export(entry.name, old) if old.finished else None
        record = old
        if old.fingerprint == stage_fp and export is not None:
            log.info("stage %s: up to date (%s), skipped", entry.name, export)
        else:
            # What its checkpoints are trained from, by content (an export rewritten unchanged is the same start).
            inputs_fp = short_hash([cls(stage_cfg).inputs_digest(), self.data_fp])
            unchanged = None
            if old.inputs_fingerprint not in (None, inputs_fp):
                _set_aside_checkpoints(entry.name, stage_cfg.training, "its start model or data changed")
            elif old.finished and (refused := _refused_resume(stage_cfg)):
                # a finished run's checkpoints, and settings changed since: train anew (an interrupted run stops
                # with the resume's error instead, so that hours of training are not restarted unasked)
                _set_aside_checkpoints(entry.name, stage_cfg.training, f"settings a resume cannot change: {refused}")
            elif export is not None and old.inputs_fingerprint == inputs_fp:
                unchanged = self._no_steps_left(entry.name, old, stage_cfg, stage_fp)
            record = unchanged or self.retrain(entry, cls, stage_cfg, wiring, stage_fp, inputs_fp, start_fp)
        output = (Path(record.final_dir or ""), record.output_fingerprint)
        if self.cfg.eval is not None and entry.evaluate:
            eval_name = output[0].name  # <stage>_final, or <stage>_final_candidate while it awaits its gate
            logs = self.run_dir / "logs" / entry.name
            record.eval = self.evaluate(output[0], eval_name, output[1], entry.eval_set, logs)
            record.eval_dir = str(self.run_dir / "evals" / eval_name)
            record.status = "evaluated"
            if self.cfg.gates is not None and entry.gate is not None:
                self.gate(entry, record)
        self.promote(entry, record)
        self.save()
        return self.final_dir(entry.name), record.output_fingerprint

    def _no_steps_left(self, name: str, old: StageRecord, stage_cfg: Any, stage_fp: str) -> StageRecord | None:
        """A finished stage whose changed settings a resume would accept but that has no steps left to apply
        them to: say so and keep its record (None: there are steps left, so the stage resumes and applies them)."""
        from llm_pipeline.checkpoint.dcp import list_checkpoints
        from llm_pipeline.train.resume import check_resume_config
        from llm_pipeline.train.trainer import TrainingError

        t = stage_cfg.training
        ckpts = list_checkpoints(t.output_dir)
        if not ckpts or t.max_steps is None or ckpts[-1][0] < t.max_steps:
            return None
        step, newest = ckpts[-1]
        try:
            changed = check_resume_config(newest, stage_cfg)
        except (TrainingError, RuntimeError, OSError):
            return None
        if not changed:  # only paths or logging differ (or the record predates content fingerprints)
            log.info("stage %s: up to date (%s), skipped", name, old.final_dir)
            old.fingerprint = stage_fp
            return old
        log.warning(
            "stage %s: finished at step %d (max_steps %d): nothing is left to train with the changed setting(s) "
            "%s, so they were NOT applied; its export, checkpoints and record stay as they were (raise "
            "training.max_steps to train on with them)", name, step, t.max_steps, "; ".join(changed),
        )  # fmt: skip
        return old

    def retrain(
        self,
        entry: StageEntry,
        cls: Any,
        stage_cfg: Any,
        wiring: dict[str, Any],
        stage_fp: str,
        inputs_fp: str,
        start_fp: str | None,
    ) -> StageRecord:
        """Train (or resume) the stage. While the stage has an export, the new one is a candidate
        (``<stage>_final_candidate``) until its gate passes: a promoted model is never overwritten ungated."""
        config_hash = short_hash(config_to_dict(stage_cfg))
        if self.final_dir(entry.name).exists():
            candidate = self.final_dir(entry.name, candidate=True)
            log.info("stage %s: training a candidate at %s (%s stays until the candidate passes its gate)",
                     entry.name, candidate, self.final_dir(entry.name))  # fmt: skip
            wiring = {**wiring, "training.final_dir": str(candidate)}
            stage_cfg = load_config(cls.config_class, entry.config, entry.set, **wiring)
        record = StageRecord(
            kind=entry.kind,
            fingerprint=stage_fp,
            inputs_fingerprint=inputs_fp,
            config_hash=config_hash,
            start_fingerprint=start_fp,
        )
        self.summary.stages[entry.name] = record
        self.save()
        t0 = time.time()
        self.train(entry, cls, stage_cfg, wiring, record)
        record.wall_s = round(time.time() - t0, 1)
        record.output_fingerprint = self.fp(record.final_dir)
        record.status = "trained"
        self.save()
        return record

    def start_model(
        self, cls: Any, stage_cfg: Any, start_dir: Path | None, start_fp: str | None
    ) -> tuple[Path, str | None]:
        """The first stage's starting weights, materialised once and scored as the first baseline."""
        if start_dir is None and stage_cfg.model.init_from is not None:
            start_dir = Path(stage_cfg.model.init_from)
            start_fp = self.fp(start_dir)
        if start_dir is None:
            out = self.run_dir / "checkpoints" / "init_final"
            init_fp = short_hash([config_to_dict(stage_cfg.model), stage_cfg.training.seed])
            record = self.summary.init or InitRecord()
            if record.fingerprint != init_fp or record.output_fingerprint != self.fp(out):
                _materialise_start(stage_cfg, out, cls(stage_cfg).tokenizer_dir())
                self.summary.init = InitRecord(fingerprint=init_fp, output_fingerprint=self.fp(out))
            start_dir, start_fp = out, self.summary.init.output_fingerprint if self.summary.init else None
        self.summary.init_eval = self.evaluate(start_dir, "init_final", start_fp, [], None)
        return start_dir, start_fp

    def train(self, entry: StageEntry, cls: Any, stage_cfg: Any, wiring: dict[str, Any], record: StageRecord) -> None:
        if self.ranks is not None:  # every rank of the job trains it with this one
            self.ranks.order("train", (entry.kind, stage_cfg))
        elif entry.nproc_per_node > 1:
            final_dir = _run_with_torchrun(entry, wiring, stage_cfg.training.resolved_final_dir, self.lock_token)
            record.final_dir, record.nproc_per_node = str(final_dir), entry.nproc_per_node
            record.exports = {"model": str(final_dir)}
            return
        from llm_pipeline.train.stage import run_stage

        result = run_stage(cls(stage_cfg))
        if result.status != "completed" or result.final_dir is None:
            record.status = result.status
            record.steps = result.step
            self.save()
            raise StageStopped(
                f"stage {entry.name} {result.status} at step {result.step}; checkpoint {result.checkpoint} saved. "
                "Run the same command again to resume.",
                result.status,
            )
        record.final_dir = str(result.final_dir)
        record.exports = {k: str(v) for k, v in result.exports.items()}
        record.steps = result.step
        record.tokens_seen = result.tokens_seen
        record.val_losses = dict(result.val_losses)
        record.eval_metrics = dict(result.eval_metrics)
        record.skipped_steps = result.skipped_steps
        record.empty_batches = result.empty_batches
        record.oom_events = result.oom_events
        record.stats = dict(result.stats)

    def generate(self, model_dir: Path | None) -> None:
        if self.cfg.generate is not None and model_dir is not None:
            self.summary.generate = _generate(model_dir, self.cfg.generate)


def run_pipeline(cfg: PipelineConfig, *, start: str | None = None, only: str | None = None) -> dict[str, Any]:
    """Run the configured steps in order (all, from ``start`` on, or ``only`` one); returns the summary.

    The run folder is locked first, before anything is read, repacked, evaluated or moved: a second run
    (``run``, ``--only``, ``--from``), a standalone stage writing inside it or a ``ckpt`` verb that changes
    it is refused while this one lives.
    """
    ranks = _Ranks.join() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if ranks is not None and not ranks.is_main:
        return ranks.follow()
    try:
        if ranks is not None and (many := [s.name for s in cfg.stages if s.nproc_per_node > 1]):
            log.warning(
                "stages %s: nproc_per_node applies to a pipeline started as one process; this one is a torchrun job "
                "whose %s ranks train every stage",
                ", ".join(many),
                os.environ.get("WORLD_SIZE"),
            )
        with _run_lock(cfg.run_dir) as lock:
            save_config(cfg, cfg.run_dir / "pipeline.resolved.yaml")
            run = _Run(cfg, start=start, only=only, lock_token=lock.owner.token if lock.owner else "", ranks=ranks)
            _check_gates(cfg, run.selected)  # a gate that cannot be checked must stop the run before it trains
            try:
                run.data()
                run.stages()
            finally:
                run.save()
                if cfg.report:
                    _write_report(cfg.run_dir)
            summary = run.summary.to_json()
    except BaseException as e:
        if ranks is not None:
            ranks.stop(e)
        raise
    if ranks is not None:
        ranks.order("done", summary)
    return summary


class _Ranks:
    """The pipeline launched as one torchrun job over several nodes (``torchrun --nnodes N ... -m llm_pipeline
    run``): rank 0 runs it as one process would (the lock, data, evaluations, gates, promotions, exports, the
    records), and every rank trains each stage together, on rank 0's order. Orders travel on a gloo group with
    no practical timeout: the other ranks wait there while rank 0 prepares data or evaluates, which may take
    hours. The run folder must be on a filesystem every node sees."""

    def __init__(self, is_main: bool, group: Any) -> None:
        self.is_main, self.group = is_main, group

    @classmethod
    def join(cls) -> _Ranks:
        import datetime

        import torch.distributed as dist

        from llm_pipeline.train.parallel import init_distributed

        info = init_distributed("auto")  # the stages' run_stage finds the group made and joins it
        return cls(info.is_main, dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30)))

    def _broadcast(self, message: Any) -> Any:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def order(self, what: str, payload: Any) -> None:
        """Rank 0: tell the other ranks what comes next (``train`` a stage, ``done``, ``stop``)."""
        self._broadcast((what, payload))

    def stop(self, error: BaseException) -> None:
        status = error.status if isinstance(error, StageStopped) else None
        self.order("stop", (type(error).__name__, str(error), status))

    def follow(self) -> dict[str, Any]:
        """Any other rank: train the stages rank 0 orders; end as rank 0 ends (same summary, or same error)."""
        from llm_pipeline.train.stage import run_stage

        while True:
            what, payload = self._broadcast(None)
            if what == "train":
                kind, stage_cfg = payload
                run_stage(stage_class(kind)(stage_cfg))
            elif what == "done":
                return payload
            else:
                name, message, status = payload
                if name == "StageStopped":
                    raise StageStopped(message, status)
                if name == "GateBlocked":
                    raise GateBlocked(message)
                raise RuntimeError(f"rank 0 stopped the pipeline: {name}: {message}")


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[FolderLock]:
    """Own ``run_dir`` for the whole run; refuse at once when a run, or a stage started on its own, is in it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(run_dir, purpose="pipeline run") as lock:
        checkpoints = run_dir / "checkpoints"
        for folder in sorted(checkpoints.iterdir()) if checkpoints.is_dir() else []:
            owner = live_owner(folder) if folder.is_dir() else None
            if owner is not None and lock.owner is not None and owner.token != lock.owner.token:
                raise FolderLocked(
                    f"{folder} is in use by {owner.describe()}; the pipeline would train into it. Wait for that "
                    f"run to finish, stop it (kill {owner.pid}), or use another run folder"
                )
        yield lock


def gate_baseline(cfg: PipelineConfig, entry: StageEntry, named: str | None) -> str | None:
    """The stage whose ``evals/<stage>_final`` a gate's regression rules compare with, for ``entry`` in this
    pipeline: ``previous`` is the model it started from (the stage before it; ``init`` for a first stage
    whose starting model is evaluated). A named stage must come before ``entry`` in this pipeline (or be
    ``init``): a results folder of a stage the pipeline no longer has would be a stale run's, so it is refused.
    """
    from llm_pipeline.config import ConfigError
    from llm_pipeline.gates import PREVIOUS

    if named is None:
        return None
    i = next(k for k, s in enumerate(cfg.stages) if s.name == entry.name)
    evaluated = cfg.eval is not None
    earlier = [s.name for s in cfg.stages[:i] if s.evaluate and evaluated]
    earlier += ["init"] if cfg.evaluate_start and evaluated else []
    if named == PREVIOUS:
        if entry.start_from == "previous" and cfg.stages[i - 1].name in earlier:
            return cfg.stages[i - 1].name
        if i == 0 and "init" in earlier:
            return "init"
        raise ConfigError(
            f"gate {entry.gate!r} of stage {entry.name}: baseline_stage 'previous' is the model the stage starts "
            f"from, and start_from {str(entry.start_from)!r} is not evaluated in this pipeline; name the "
            f"baseline stage (one of: {', '.join(earlier) or 'none'}) or drop the regression rules"
        )
    if named not in earlier:
        raise ConfigError(
            f"gate {entry.gate!r} of stage {entry.name}: baseline_stage {named!r} is not evaluated before "
            f"{entry.name} in this pipeline (earlier: {', '.join(earlier) or 'none'}), so its regression rules "
            "would read no results, or an earlier run's; set baseline_stage: previous (the model the stage "
            "started from) or one of those"
        )
    return named


def recorded_gate_baseline(results: Path, gate: str, gates: str | os.PathLike[str]) -> str | None:
    """:func:`gate_baseline` (with the gates file ``gates``) in the run whose ``evals/<stage>_final`` is
    ``results`` (a folder or its results.json), from its ``pipeline.resolved.yaml``; None outside a pipeline
    run or for a gate no stage of it uses (the gate's own ``baseline_stage`` then applies)."""
    from llm_pipeline.gates import GatesConfig

    folder = results if results.is_dir() else results.parent
    resolved = folder.parent.parent / "pipeline.resolved.yaml"
    if not resolved.is_file():
        return None
    cfg = load_config(PipelineConfig, resolved)
    entry = next((s for s in cfg.stages if s.gate == gate and folder.name == f"{s.name}_final"), None)
    named = load_config(GatesConfig, gates).stages.get(gate)
    if entry is None or named is None:
        return None
    return gate_baseline(cfg, entry, named.baseline_stage)


def _check_gates(cfg: PipelineConfig, selected: set[str]) -> None:
    """Every selected stage's gate is in the gates file, its baseline is a stage evaluated before it, and the
    stage is evaluated (its gate reads the results)."""
    if cfg.gates is None:
        return
    from llm_pipeline.config import ConfigError
    from llm_pipeline.gates import GatesConfig

    gates = load_config(GatesConfig, cfg.gates)
    for entry in cfg.stages:
        if entry.gate is None or entry.name not in selected:
            continue
        if entry.gate not in gates.stages:
            raise ConfigError(
                f"{cfg.gates}: no gate {entry.gate!r} for stage {entry.name} (defined: {', '.join(gates.stages)}); "
                "add it or set the stage's gate to another name or null"
            )
        gate_baseline(cfg, entry, gates.stages[entry.gate].baseline_stage)
        if cfg.eval is None or not entry.evaluate:
            raise ConfigError(
                f"stage {entry.name} has gate {entry.gate!r} but is not evaluated (the pipeline's eval section is "
                "missing or the stage sets evaluate: false), so its gate could not be checked: enable the "
                "evaluation or set gate: null"
            )


def _write_report(run_dir: Path) -> None:
    """The run's report, also after a blocked gate or a stopped stage (it says what is missing)."""
    from llm_pipeline.report import write_report

    try:
        html, card = write_report(run_dir)
    except Exception as e:  # a report must never hide the run's own outcome
        log.warning("report not written: %s: %s", type(e).__name__, e)
        return
    log.info("report: %s and %s", html, card)


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.4g}"


def _last_eval_metrics(log_dir: Path) -> dict[str, Any]:
    """The stage's last in-training evaluation, from its ``metrics.jsonl`` (works for torchrun stages too).

    The evaluation before its first step (the starting model on the stage's own held-out data) goes
    under ``start``, so a gate can ask for an improvement on that same data (``baseline_metric``).
    """
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    first: dict[str, Any] = {}
    last: dict[str, Any] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("split") == "eval":
            last = row
            if row.get("step") == 0:
                first = row

    def numbers(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in ("step", "split", "time") and isinstance(v, int | float)}

    out = numbers(last)
    if first and out:
        out["start"] = numbers(first)
    return out


def _refused_resume(stage_cfg: Any) -> str | None:
    """The changed settings (one line) that forbid resuming the stage's newest checkpoint with ``stage_cfg``."""
    from llm_pipeline.checkpoint.dcp import latest_checkpoint
    from llm_pipeline.train.resume import check_resume_config
    from llm_pipeline.train.trainer import TrainingError

    newest = latest_checkpoint(stage_cfg.training.output_dir)
    if newest is None:
        return None
    try:
        check_resume_config(newest, stage_cfg)
    except TrainingError as e:
        return "; ".join(line.strip() for line in str(e).splitlines()[1:])
    except (RuntimeError, OSError):
        return None  # a damaged checkpoint: the resume falls back to an older one (or says why it cannot)
    return None


def _set_aside_checkpoints(name: str, training: Any, why: str) -> None:
    """Move a stage's checkpoints out of the way (kept, renamed, with their logs) so the stage trains from its
    new start model, data or settings instead of resuming them (a resume keeps the checkpoint's weights and
    refuses settings it cannot apply)."""
    from llm_pipeline.checkpoint.dcp import list_checkpoints

    output_dir = Path(training.output_dir)
    if not list_checkpoints(output_dir):
        return
    # The stage folder's own lock first: a folder another process trains in (a stage started on its own) is
    # never moved from under it; that raises FolderLocked naming the process instead.
    lock = FolderLock(output_dir, purpose="setting checkpoints aside").acquire()
    aside = _free_name(output_dir)
    logs = Path(training.resolved_logging_dir)
    if logs.is_dir() and not logs.is_relative_to(output_dir):
        logs.rename(logs.with_name(logs.name + aside.name.removeprefix(output_dir.name)))
    lock.move_folder(aside)
    log.warning(
        "stage %s: %s since %s was trained: training again (the old checkpoints are kept in %s; delete them "
        "when not needed)", name, why, output_dir, aside,
    )  # fmt: skip


def _free_name(path: Path) -> Path:
    """``<path>.replaced-<time>`` (with a counter when taken): where a replaced folder is kept."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        aside = path.with_name(f"{path.name}.replaced-{stamp}" + (f"-{n}" if n else ""))
        if not aside.exists():
            return aside
    raise FileExistsError(f"{path}: no free name to keep it under (.replaced-{stamp}-N); remove old ones")


def _run_with_torchrun(entry: StageEntry, wiring: dict[str, Any], final_dir: Path, lock_token: str) -> Path:
    """Run ``llm-pipeline <kind>`` as ``nproc_per_node`` torchrun workers; the other steps stay here."""
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={entry.nproc_per_node}",
        "-m", "llm_pipeline", entry.kind, "--config", str(entry.config),
    ]  # fmt: skip
    for item in [*entry.set, *(f"{k}={v}" for k, v in wiring.items())]:
        cmd += ["--set", item]
    log.info("%s: %s", entry.name, " ".join(cmd))
    # The workers lock their stage folder inside the run folder this process holds: they carry its token.
    inherited = [t for t in os.environ.get(TOKEN_ENV, "").split(",") if t]
    code = subprocess.call(cmd, env={**os.environ, TOKEN_ENV: ",".join([*inherited, lock_token])})
    if code == 75:
        raise StageStopped(
            f"stage {entry.name} was stopped by a signal; its checkpoint is saved: run the same command to resume",
            "preempted",
        )
    if code != 0:
        raise RuntimeError(f"stage {entry.name} under torchrun exited with code {code}")
    if not (final_dir / "config.json").is_file():
        raise RuntimeError(f"stage {entry.name} finished but wrote no HF export at {final_dir}")
    return final_dir


def _materialise_start(stage_cfg: Any, out: Path, tokenizer_dir: Path | None) -> Path:
    """Write the model the first stage starts from (a preset's seeded init), so it can be evaluated."""
    from llm_pipeline.checkpoint.hf import save_pretrained
    from llm_pipeline.model.llama import build_model

    model = build_model(stage_cfg.model.resolve(), seed=stage_cfg.training.seed)
    return save_pretrained(model, out, tokenizer_dir=tokenizer_dir, metadata={"role": "pipeline start"})


def _generate(model_dir: Path, gen: GenerateStage) -> list[dict[str, str]]:
    """Sample the configured prompts from ``model_dir`` (recorded with each completion)."""
    from llm_pipeline.checkpoint.hf import load_pretrained
    from llm_pipeline.data.tokenizer import load_tokenizer
    from llm_pipeline.model.generate import generate_text

    model = load_pretrained(model_dir)
    texts = generate_text(
        model,
        load_tokenizer(model_dir),
        gen.prompts,
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature,
        top_k=gen.top_k,
        seed=gen.seed,
    )
    for p, t in zip(gen.prompts, texts, strict=True):
        log.info("generate (%s): %r -> %r", model_dir.name, p, t)
    return [{"model": str(model_dir), "prompt": p, "completion": t} for p, t in zip(gen.prompts, texts, strict=True)]
