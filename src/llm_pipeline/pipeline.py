"""The stage runner behind ``make demo`` / ``llm-pipeline demo``: one config, every stage in order.

data -> (baseline eval of the starting model) -> pretrain -> eval -> promotion gate -> generate.
Each stage is optional (present in the config = run) and writes under ``run_dir``; stages hand
over through the standard formats (packed shards, HF model directories, results.json), so the
pipeline only wires paths. Stage configs are the same files the individual commands take.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from llm_pipeline.config import StrictModel, load_config, save_config

log = logging.getLogger(__name__)


class StageRef(StrictModel):
    """A stage run from its own config file, with overrides; outputs are placed under run_dir."""

    config: Path = Field(description="the stage's YAML config")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides, as with --set")


class PretrainStage(StageRef):
    """Pretraining, in this process or as ``torchrun`` workers on this node (FSDP2 across its GPUs)."""

    nproc_per_node: int = Field(1, ge=1, description="processes (GPUs) on this node; >1 launches torchrun")


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
    pretrain: PretrainStage | None = Field(None, description="pretraining (its data paths are wired to the data stage)")
    eval: StageRef | None = Field(None, description="evaluation config applied to each stage's final model")
    evaluate_init: bool = Field(True, description="also evaluate the starting model, as the first gate's baseline")
    gates: Path | None = Field(None, description="promotion gates config; a blocked gate stops the pipeline")
    generate: GenerateStage | None = None


class GateBlocked(RuntimeError):
    """A promotion gate failed: later stages must not start from this model."""


def _evaluate(cfg: PipelineConfig, model_dir: Path, name: str, data_overrides: dict[str, str]) -> dict[str, Any]:
    from llm_pipeline.eval.config import EvalConfig
    from llm_pipeline.eval.runner import run_evals

    assert cfg.eval is not None
    eval_cfg = load_config(EvalConfig, cfg.eval.config, cfg.eval.set, **data_overrides)
    out = cfg.run_dir / "evals" / name
    results = run_evals(model_dir, eval_cfg, output=out)
    log.info("eval %s -> %s", name, out / "results.json")
    return results.get("metrics", {})


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the configured stages in order; returns (and writes) a summary of what each produced."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "pipeline.resolved.yaml")
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    packed_dir: Path | None = None
    tokenizer_dir: Path | None = None
    final_dir: Path | None = None

    if cfg.data is not None:
        from llm_pipeline.data.config import DataConfig
        from llm_pipeline.data.prepare import prepare

        data_cfg = load_config(DataConfig, cfg.data.config, cfg.data.set, output_dir=str(run_dir / "data"))
        summary["data"] = prepare(data_cfg)
        packed_dir, tokenizer_dir = data_cfg.packed_dir, data_cfg.tokenizer_dir
    eval_overrides = {"perplexity.packed_data": str(packed_dir)} if packed_dir else {}

    if cfg.pretrain is not None:
        from llm_pipeline.train.config import PretrainConfig
        from llm_pipeline.train.pretrain import run_pretraining

        wiring: dict[str, Any] = {
            "training.output_dir": str(run_dir / "checkpoints" / "pretrain"),
            "training.logging_dir": str(run_dir / "logs" / "pretrain"),
        }
        if packed_dir is not None and tokenizer_dir is not None:
            wiring |= {"data.path": str(packed_dir), "data.tokenizer_dir": str(tokenizer_dir)}
        pre_cfg = load_config(PretrainConfig, cfg.pretrain.config, cfg.pretrain.set, **wiring)
        if cfg.eval is not None and cfg.evaluate_init:
            # Materialise the starting weights, score them, and train from exactly those weights.
            init_dir = _materialise_start(pre_cfg, run_dir / "checkpoints" / "init_final")
            summary["init_eval"] = _evaluate(cfg, init_dir, "init_final", eval_overrides)
            wiring["model.init_from"] = str(init_dir)
            wiring["model.overrides"] = {}  # already applied to init_dir's config
            pre_cfg = load_config(PretrainConfig, cfg.pretrain.config, cfg.pretrain.set, **wiring)
        if cfg.pretrain.nproc_per_node > 1:
            final_dir = _pretrain_with_torchrun(cfg.pretrain, wiring, pre_cfg.training.resolved_final_dir)
            summary["pretrain"] = {"final_dir": str(final_dir), "nproc_per_node": cfg.pretrain.nproc_per_node}
        else:
            result = run_pretraining(pre_cfg)
            if result.status != "completed" or result.final_dir is None:
                raise RuntimeError(f"pretraining ended with status {result.status!r} at step {result.step}")
            final_dir = Path(result.final_dir)
            summary["pretrain"] = {
                "final_dir": str(final_dir),
                "steps": result.step,
                "val_losses": result.val_losses,
                "skipped_steps": result.skipped_steps,
            }
        if cfg.eval is not None:
            summary["pretrain_eval"] = _evaluate(cfg, final_dir, "pretrain_final", eval_overrides)
            if cfg.gates is not None:
                from llm_pipeline.gates import check_gate

                verdict = check_gate("pretrain", run_dir / "evals" / "pretrain_final", config=cfg.gates)
                summary["pretrain_gate"] = verdict.to_dict()
                _write_summary(run_dir, summary)
                if not verdict.passed:
                    failed = [f"{r.metric}: {r.reason}" for r in verdict.results if not r.passed]
                    raise GateBlocked("pretrain gate blocked promotion: " + "; ".join(failed))
                log.info("pretrain gate: passed")

    if cfg.generate is not None and final_dir is not None:
        summary["generate"] = _generate(final_dir, cfg.generate)
    _write_summary(run_dir, summary)
    return summary


def _pretrain_with_torchrun(stage: PretrainStage, wiring: dict[str, Any], final_dir: Path) -> Path:
    """Run ``llm-pipeline pretrain`` as ``nproc_per_node`` torchrun workers; the other stages stay here."""
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={stage.nproc_per_node}",
        "-m", "llm_pipeline", "pretrain", "--config", str(stage.config),
    ]  # fmt: skip
    for item in [*stage.set, *(f"{k}={v}" for k, v in wiring.items())]:
        cmd += ["--set", item]
    log.info("pretrain: %s", " ".join(cmd))
    code = subprocess.call(cmd)
    if code != 0:
        raise RuntimeError(f"pretraining under torchrun exited with code {code} (75 = stopped by a signal, resumable)")
    if not (final_dir / "config.json").is_file():
        raise RuntimeError(f"pretraining finished but wrote no HF export at {final_dir}")
    return final_dir


def _materialise_start(pre_cfg: Any, out: Path) -> Path:
    """Write the model pretraining will start from, so it can be evaluated as the baseline."""
    from llm_pipeline.checkpoint.hf import load_pretrained, save_pretrained
    from llm_pipeline.model.llama import build_model

    if pre_cfg.model.init_from is not None:
        model = load_pretrained(pre_cfg.model.init_from)
    else:
        model = build_model(pre_cfg.model.resolve(), seed=pre_cfg.training.seed)
    return save_pretrained(model, out, tokenizer_dir=pre_cfg.data.tokenizer_dir, metadata={"role": "pretrain start"})


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
