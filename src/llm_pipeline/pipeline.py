"""The pipeline behind ``llm-pipeline run`` / ``make demo``: data, then a list of training stages.

data -> for each stage in ``stages``: train -> evaluate -> promotion gate -> (next stage starts from
this one's export) -> generate from the last model.

A stage entry names its kind (``pretrain``, ``sft``, ``dpo``, ``lora``: see
:data:`llm_pipeline.train.stage.STAGE_KINDS`), its own config file (the same file the single
command takes), what it starts from, and its gate. The pipeline only wires paths under
``run_dir``: adding a stage is a config entry, not code here. Every stage resumes from its newest
checkpoint, so running the same command again after an interruption picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llm_pipeline.config import StrictModel, load_config, save_config
from llm_pipeline.train.stage import STAGE_KINDS, WiringContext, stage_class

log = logging.getLogger(__name__)


class StageRef(StrictModel):
    """A step run from its own config file, with overrides; outputs are placed under run_dir."""

    config: Path = Field(description="the step's YAML config")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides, as with --set")


class StageEntry(StageRef):
    """One training stage of the pipeline."""

    name: str = Field(description="unique name: checkpoints/<name>, evals/<name>_final, the gate of that name")
    kind: str = Field(description=f"stage kind: one of {', '.join(STAGE_KINDS)}")
    start_from: Literal["config", "previous"] | Path = Field(
        "previous",
        description="'previous' = the last stage's export; 'config' = the stage config's own model section "
        "(a preset's random init or its init_from); or an HF model directory",
    )
    nproc_per_node: int = Field(1, ge=1, description="processes (GPUs) on this node; >1 launches torchrun")
    evaluate: bool = Field(True, description="run the eval suite on the stage's export")
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

    @model_validator(mode="after")
    def _check_stages(self) -> PipelineConfig:
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dupes)}")
        if self.stages and self.stages[0].start_from == "previous":
            raise ValueError(
                f"the first stage ({self.stages[0].name}) has no previous stage to start from: "
                "set its start_from to 'config' or a model directory"
            )
        return self


class GateBlocked(RuntimeError):
    """A promotion gate failed: later stages must not start from this model."""


class StageStopped(RuntimeError):
    """A stage stopped before finishing (signal, divergence); its checkpoint is saved."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


def _evaluate(cfg: PipelineConfig, model_dir: Path, name: str, data_overrides: dict[str, str]) -> dict[str, Any]:
    from llm_pipeline.eval.config import EvalConfig
    from llm_pipeline.eval.runner import run_evals

    assert cfg.eval is not None
    eval_cfg = load_config(EvalConfig, cfg.eval.config, cfg.eval.set, **data_overrides)
    out = cfg.run_dir / "evals" / name
    results = run_evals(model_dir, eval_cfg, output=out)
    log.info("eval %s -> %s", name, out / "results.json")
    return results.get("metrics", {})


def _check_gate(cfg: PipelineConfig, entry: StageEntry, summary: dict[str, Any]) -> None:
    from llm_pipeline.gates import check_gate

    assert cfg.gates is not None and entry.gate is not None
    verdict = check_gate(entry.gate, cfg.run_dir / "evals" / f"{entry.name}_final", config=cfg.gates)
    summary["stages"][entry.name]["gate"] = verdict.to_dict()
    _write_summary(cfg.run_dir, summary)
    if not verdict.passed:
        failed = [f"{r.metric}: {r.reason}" for r in verdict.results if not r.passed]
        raise GateBlocked(f"{entry.name} gate blocked promotion: " + "; ".join(failed))
    log.info("%s gate: passed", entry.name)


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the configured stages in order; returns (and writes) a summary of what each produced."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "pipeline.resolved.yaml")
    summary: dict[str, Any] = {"run_dir": str(run_dir), "stages": {}}
    packed_dir: Path | None = None
    tokenizer_dir: Path | None = None

    if cfg.data is not None:
        from llm_pipeline.data.config import DataConfig
        from llm_pipeline.data.prepare import prepare

        data_cfg = load_config(DataConfig, cfg.data.config, cfg.data.set, output_dir=str(run_dir / "data"))
        summary["data"] = prepare(data_cfg)
        packed_dir, tokenizer_dir = data_cfg.packed_dir, data_cfg.tokenizer_dir
    eval_overrides = {"perplexity.packed_data": str(packed_dir)} if packed_dir else {}

    previous: Path | None = None
    for i, entry in enumerate(cfg.stages):
        start = entry.start_from
        start_dir = previous if start == "previous" else (None if start == "config" else Path(start))
        if start_dir is not None and not (start_dir / "config.json").is_file():
            raise FileNotFoundError(f"stage {entry.name}: start_from {start_dir} is not a model directory")
        ctx = WiringContext(run_dir, entry.name, start_dir, packed_dir, tokenizer_dir)
        cls = stage_class(entry.kind)
        wiring: dict[str, Any] = {
            "training.output_dir": str(run_dir / "checkpoints" / entry.name),
            "training.final_dir": str(run_dir / "checkpoints" / f"{entry.name}_final"),
            "training.logging_dir": str(run_dir / "logs" / entry.name),
            "training.resume_from_checkpoint": "auto",
            **cls.pipeline_wiring(ctx),
        }
        if start_dir is not None:
            wiring |= {"model.init_from": str(start_dir), "model.overrides": {}}
        stage_cfg = load_config(cls.config_class, entry.config, entry.set, **wiring)
        if i == 0 and cfg.eval is not None and cfg.evaluate_start:
            # Materialise the starting weights, score them, and train from exactly those weights.
            init_dir = stage_cfg.model.init_from or _materialise_start(
                stage_cfg, run_dir / "checkpoints" / "init_final", cls(stage_cfg).tokenizer_dir()
            )
            summary["init_eval"] = _evaluate(cfg, Path(init_dir), "init_final", eval_overrides)
            wiring |= {"model.init_from": str(init_dir), "model.overrides": {}}
            stage_cfg = load_config(cls.config_class, entry.config, entry.set, **wiring)
        record: dict[str, Any] = {"kind": entry.kind}
        summary["stages"][entry.name] = record
        if entry.nproc_per_node > 1:
            final_dir = _run_with_torchrun(entry, wiring, stage_cfg.training.resolved_final_dir)
            record |= {"final_dir": str(final_dir), "nproc_per_node": entry.nproc_per_node}
        else:
            from llm_pipeline.train.stage import run_stage

            result = run_stage(cls(stage_cfg))
            if result.status != "completed" or result.final_dir is None:
                _write_summary(run_dir, summary)
                raise StageStopped(
                    f"stage {entry.name} {result.status} at step {result.step}; checkpoint {result.checkpoint} saved. "
                    "Run the same command again to resume.",
                    result.status,
                )
            final_dir = Path(result.final_dir)
            record |= {
                "final_dir": str(final_dir),
                "exports": {k: str(v) for k, v in result.exports.items()},
                "steps": result.step,
                "tokens_seen": result.tokens_seen,
                "val_losses": result.val_losses,
                "eval_metrics": result.eval_metrics,
                "skipped_steps": result.skipped_steps,
            }
        if cfg.eval is not None and entry.evaluate:
            record["eval"] = _evaluate(cfg, final_dir, f"{entry.name}_final", eval_overrides)
            if cfg.gates is not None and entry.gate is not None:
                _check_gate(cfg, entry, summary)
        previous = final_dir

    if cfg.generate is not None and previous is not None:
        summary["generate"] = _generate(previous, cfg.generate)
    _write_summary(run_dir, summary)
    return summary


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
        log.info("generate: %r -> %r", p, t)
    return [{"prompt": p, "completion": t} for p, t in zip(gen.prompts, texts, strict=True)]


def _write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
