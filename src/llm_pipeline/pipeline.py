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

A passed gate writes ``promoted/<stage>.json``; a blocked gate stops the run (exit 3) naming each
failed rule, by how much, and the baseline it was compared with. ``summary.json`` records every
step (fingerprints, wall time, exports, evaluations, verdicts) and is what ``llm-pipeline report``
reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llm_pipeline.checkpoint.fsio import write_text_synced
from llm_pipeline.config import StrictModel, config_to_dict, load_config, save_config
from llm_pipeline.data.manifest import fingerprint as data_fingerprint
from llm_pipeline.train.stage import STAGE_KINDS, WiringContext, stage_class

log = logging.getLogger(__name__)
SUMMARY = "summary.json"
FINISHED = ("trained", "evaluated", "promoted", "blocked")  # a stage record's states after its training ended


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
# Fingerprints and the summary
# --------------------------------------------------------------------------------------------


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-able value (configs, other fingerprints): the data steps' hash, cut."""
    return data_fingerprint(obj)[:16]


def folder_fingerprint(path: Path) -> str | None:
    """Name, size and modification time of every file in an export folder (cheap; a re-export changes it)."""
    if not path.is_dir():
        return None
    files = sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
                   if p.is_file())  # fmt: skip
    return fingerprint(files) if files else None


def _file_fingerprint(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The previous runs' record of this folder (empty when there is none or it is unreadable)."""
    p = run_dir / SUMMARY
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    tmp = run_dir / f".{SUMMARY}.tmp"
    write_text_synced(tmp, json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(run_dir / SUMMARY)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Run:
    """One invocation of the pipeline: its config, the selected steps and the summary being written."""

    def __init__(self, cfg: PipelineConfig, *, start: str | None, only: str | None) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run_dir
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
        self.summary = read_summary(self.run_dir)
        self.summary["run_dir"] = str(self.run_dir)
        self.summary.setdefault("stages", {})
        self.packed_dir: Path | None = None
        self.tokenizer_dir: Path | None = None
        self.data_fp: str | None = None

    def save(self) -> None:
        _write_summary(self.run_dir, self.summary)

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
            self.summary["data"] = prepare(data_cfg)
        elif not (data_cfg.packed_dir / MANIFEST).is_file():
            raise FileNotFoundError(
                f"{data_cfg.packed_dir}: no packed data yet; run the pipeline without --from/--only"
            )
        self.packed_dir, self.tokenizer_dir = data_cfg.packed_dir, data_cfg.tokenizer_dir
        self.data_fp = _file_fingerprint(data_cfg.packed_dir / MANIFEST)

    def eval_overrides(self) -> dict[str, str]:
        return {"perplexity.packed_data": str(self.packed_dir)} if self.packed_dir else {}

    # ---- evaluation and gates --------------------------------------------------------------------

    def evaluate(
        self, model_dir: Path, name: str, model_fp: str | None, extra: list[str], stage_logs: Path | None
    ) -> dict[str, Any]:
        """Run the eval suite on ``model_dir`` unless the same model and config were already scored."""
        from llm_pipeline.eval.config import EvalConfig
        from llm_pipeline.eval.runner import run_evals

        assert self.cfg.eval is not None
        eval_cfg = load_config(EvalConfig, self.cfg.eval.config, [*self.cfg.eval.set, *extra], **self.eval_overrides())
        out = self.run_dir / "evals" / name
        results_file = out / "results.json"
        eval_fp = fingerprint([config_to_dict(eval_cfg), model_fp, self.data_fp])
        record = self.summary.setdefault("evals", {}).get(name, {})
        if record.get("fingerprint") == eval_fp and results_file.is_file():
            log.info("eval %s: up to date (%s), skipped", name, results_file)
            return json.loads(results_file.read_text(encoding="utf-8")).get("metrics", {})
        results = run_evals(model_dir, eval_cfg, output=out)
        stage_metrics = _last_eval_metrics(stage_logs) if stage_logs is not None else {}
        if stage_metrics:
            # The stage's own held-out metrics (SFT loss, DPO reward accuracy...) next to the suite's, for gates.
            results.setdefault("metrics", {})["stage"] = stage_metrics
            write_text_synced(results_file, json.dumps(results, indent=2, default=str) + "\n")
        self.summary["evals"][name] = {"fingerprint": eval_fp, "results": str(results_file)}
        log.info("eval %s -> %s", name, results_file)
        return results.get("metrics", {})

    def gate(self, entry: StageEntry, record: dict[str, Any]) -> None:
        from llm_pipeline.gates import GatesConfig, check_gate

        assert self.cfg.gates is not None and entry.gate is not None
        verdict = check_gate(entry.gate, self.run_dir / "evals" / f"{entry.name}_final", config=self.cfg.gates)
        record["gate"] = verdict.to_dict()
        if not verdict.passed:
            record["status"] = "blocked"
            # A promotion from an earlier run of this stage no longer holds.
            (self.run_dir / "promoted" / f"{entry.name}.json").unlink(missing_ok=True)
            self.save()
            baseline = load_config(GatesConfig, self.cfg.gates).stages[entry.gate].baseline_stage
            against = f" (baseline: {baseline}, evals/{baseline}_final)" if baseline else ""
            failed = [f"{r.metric} = {_fmt(r.value)}: {r.reason}" for r in verdict.results if not r.passed]
            raise GateBlocked(f"{entry.name} gate blocked promotion{against}:\n  " + "\n  ".join(failed))
        log.info("%s gate: passed", entry.name)

    def promote(self, entry: StageEntry, record: dict[str, Any]) -> None:
        pointer = {
            "stage": entry.name,
            "model_dir": record["final_dir"],
            "time": time.time(),
            "gate": record.get("gate"),
        }
        (self.run_dir / "promoted").mkdir(parents=True, exist_ok=True)
        write_text_synced(self.run_dir / "promoted" / f"{entry.name}.json", json.dumps(pointer, indent=2) + "\n")
        record["status"] = "promoted"

    # ---- stages ----------------------------------------------------------------------------------

    def stages(self) -> None:
        previous: tuple[Path, str | None] | None = None  # the last promoted export and its fingerprint
        sample_from = None  # the last stage this run selected (not a later one recorded by an earlier run)
        for i, entry in enumerate(self.cfg.stages):
            if entry.name not in self.selected:
                # Taken as recorded: a later selected stage starts from its promoted export, if any.
                record = self.summary["stages"].get(entry.name, {})
                promoted = record.get("status") == "promoted" and Path(record.get("final_dir", "")).is_dir()
                previous = (Path(record["final_dir"]), record.get("output_fingerprint")) if promoted else None
                continue
            previous = sample_from = self.stage(i, entry, previous)
        self.generate(sample_from[0] if sample_from else None)

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
            start_fp = folder_fingerprint(start_dir)
        ctx = WiringContext(self.run_dir, entry.name, start_dir, self.packed_dir, self.tokenizer_dir)
        wiring: dict[str, Any] = {
            "training.output_dir": str(self.run_dir / "checkpoints" / entry.name),
            "training.final_dir": str(self.run_dir / "checkpoints" / f"{entry.name}_final"),
            "training.logging_dir": str(self.run_dir / "logs" / entry.name),
            "training.resume_from_checkpoint": "auto",
            **cls.pipeline_wiring(ctx),
        }
        if start_dir is not None:
            wiring |= {"model.init_from": str(start_dir), "model.overrides": {}}
        stage_cfg = load_config(cls.config_class, entry.config, entry.set, **wiring)
        if i == 0 and self.cfg.eval is not None and self.cfg.evaluate_start:
            init_dir, start_fp = self.start_model(cls, stage_cfg, start_dir, start_fp)
            wiring |= {"model.init_from": str(init_dir), "model.overrides": {}}
            stage_cfg = load_config(cls.config_class, entry.config, entry.set, **wiring)
        stage_fp = fingerprint([config_to_dict(stage_cfg), start_fp, self.data_fp, entry.nproc_per_node])
        old = self.summary["stages"].get(entry.name, {})
        final_dir = stage_cfg.training.resolved_final_dir
        up_to_date = (
            old.get("fingerprint") == stage_fp
            and old.get("status") in FINISHED
            and old.get("output_fingerprint") == folder_fingerprint(final_dir)
        )
        if up_to_date:
            log.info("stage %s: up to date (%s), skipped", entry.name, final_dir)
            record = old
        else:
            # What its checkpoints are trained from, by content (an export rewritten unchanged is the same start).
            inputs_fp = fingerprint([cls(stage_cfg).inputs_digest(), self.data_fp])
            if old.get("inputs_fingerprint") not in (None, inputs_fp):
                _set_aside_checkpoints(entry.name, stage_cfg.training, "its start model or data changed")
            elif old.get("status") in FINISHED and (refused := _refused_resume(stage_cfg)):
                # a finished run's checkpoints, and settings changed since: train anew (an interrupted run stops
                # with the resume's error instead, so that hours of training are not restarted unasked)
                _set_aside_checkpoints(entry.name, stage_cfg.training, f"settings a resume cannot change: {refused}")
            record = {
                "kind": entry.kind,
                "fingerprint": stage_fp,
                "inputs_fingerprint": inputs_fp,
                "config_hash": fingerprint(config_to_dict(stage_cfg)),
            }
            self.summary["stages"][entry.name] = record
            self.save()
            t0 = time.time()
            self.train(entry, cls, stage_cfg, wiring, record)
            record |= {"wall_s": round(time.time() - t0, 1), "output_fingerprint": folder_fingerprint(final_dir)}
            record["status"] = "trained"
            self.save()
        output = (Path(record["final_dir"]), record.get("output_fingerprint"))
        if self.cfg.eval is not None and entry.evaluate:
            record["eval"] = self.evaluate(
                output[0], f"{entry.name}_final", output[1], entry.eval_set, self.run_dir / "logs" / entry.name
            )
            record["status"] = "evaluated"
            if self.cfg.gates is not None and entry.gate is not None:
                self.gate(entry, record)
        self.promote(entry, record)
        self.save()
        return output

    def start_model(
        self, cls: Any, stage_cfg: Any, start_dir: Path | None, start_fp: str | None
    ) -> tuple[Path, str | None]:
        """The first stage's starting weights, materialised once and scored as the first baseline."""
        if start_dir is None and stage_cfg.model.init_from is not None:
            start_dir = Path(stage_cfg.model.init_from)
            start_fp = folder_fingerprint(start_dir)
        if start_dir is None:
            out = self.run_dir / "checkpoints" / "init_final"
            init_fp = fingerprint([config_to_dict(stage_cfg.model), stage_cfg.training.seed])
            record = self.summary.get("init", {})
            if record.get("fingerprint") != init_fp or record.get("output_fingerprint") != folder_fingerprint(out):
                _materialise_start(stage_cfg, out, cls(stage_cfg).tokenizer_dir())
                self.summary["init"] = {"fingerprint": init_fp, "output_fingerprint": folder_fingerprint(out)}
            start_dir, start_fp = out, self.summary["init"]["output_fingerprint"]
        self.summary["init_eval"] = self.evaluate(start_dir, "init_final", start_fp, [], None)
        return start_dir, start_fp

    def train(self, entry: StageEntry, cls: Any, stage_cfg: Any, wiring: dict[str, Any], record: dict) -> None:
        if entry.nproc_per_node > 1:
            final_dir = _run_with_torchrun(entry, wiring, stage_cfg.training.resolved_final_dir)
            record |= {"final_dir": str(final_dir), "nproc_per_node": entry.nproc_per_node}
            return
        from llm_pipeline.train.stage import run_stage

        result = run_stage(cls(stage_cfg))
        if result.status != "completed" or result.final_dir is None:
            record["status"] = result.status
            self.save()
            raise StageStopped(
                f"stage {entry.name} {result.status} at step {result.step}; checkpoint {result.checkpoint} saved. "
                "Run the same command again to resume.",
                result.status,
            )
        record |= {
            "final_dir": str(result.final_dir),
            "exports": {k: str(v) for k, v in result.exports.items()},
            "steps": result.step,
            "tokens_seen": result.tokens_seen,
            "val_losses": result.val_losses,
            "eval_metrics": result.eval_metrics,
            "skipped_steps": result.skipped_steps,
            "empty_batches": result.empty_batches,
            "oom_events": result.oom_events,
            "stats": result.stats,
        }

    def generate(self, model_dir: Path | None) -> None:
        if self.cfg.generate is not None and model_dir is not None:
            self.summary["generate"] = _generate(model_dir, self.cfg.generate)


def run_pipeline(cfg: PipelineConfig, *, start: str | None = None, only: str | None = None) -> dict[str, Any]:
    """Run the configured steps in order (all, from ``start`` on, or ``only`` one); returns the summary."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_dir / "pipeline.resolved.yaml")
    run = _Run(cfg, start=start, only=only)
    _check_gates(cfg, run.selected)  # a gate that cannot be checked must stop the run before it trains
    try:
        run.data()
        run.stages()
    finally:
        run.save()
        if cfg.report:
            _write_report(cfg.run_dir)
    return run.summary


def _check_gates(cfg: PipelineConfig, selected: set[str]) -> None:
    """Every selected stage's gate is in the gates file and the stage is evaluated (its gate reads the results)."""
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
    suffix = f".replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    logs = Path(training.resolved_logging_dir)
    if logs.is_dir() and not logs.is_relative_to(output_dir):
        logs.rename(logs.with_name(logs.name + suffix))
    aside = output_dir.with_name(output_dir.name + suffix)
    output_dir.rename(aside)
    log.warning(
        "stage %s: %s since %s was trained: training again (the old checkpoints are kept in %s; delete them "
        "when not needed)", name, why, output_dir, aside,
    )  # fmt: skip


def _run_with_torchrun(entry: StageEntry, wiring: dict[str, Any], final_dir: Path) -> Path:
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
    code = subprocess.call(cmd)
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
