"""The stage runner behind ``make demo`` / ``llm-pipeline demo``: one config, every stage in order.

Each stage is optional (present in the config = run) and writes under ``run_dir``; later stages
read earlier stages' outputs through the standard formats (packed shards, HF directories).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import Field

from llm_pipeline.checkpoint.hf import load_pretrained, save_pretrained
from llm_pipeline.config import StrictModel, load_config, save_config
from llm_pipeline.model.generate import generate
from llm_pipeline.model.llama import build_model
from llm_pipeline.model.presets import get_preset

log = logging.getLogger(__name__)


class StageRef(StrictModel):
    """A stage run from its own config file, with overrides; its outputs go under the pipeline's run_dir."""

    config: Path = Field(description="the stage's YAML config")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides, as with --set")


class InitStage(StrictModel):
    """Random initialisation of a preset (used when no pretraining stage runs)."""

    preset: str = Field("tiny", description="model preset")
    seed: int = 0


class GenerateStage(StrictModel):
    """A few tokens from the final model, as a smoke test of the KV-cache path."""

    prompt_ids: list[int] = Field(default_factory=lambda: [1, 2, 3], description="token ids when no tokenizer")
    max_new_tokens: int = Field(16, gt=0)


class PipelineConfig(StrictModel):
    """Which stages run, with what configs, under which folder."""

    run_dir: Path = Field(Path("runs/demo"), description="everything the run writes goes here")
    data: StageRef | None = Field(None, description="data prepare (download, clean, tokenizer, pack)")
    init: InitStage | None = InitStage()
    generate: GenerateStage | None = GenerateStage()


def run_pipeline(cfg: PipelineConfig) -> dict[str, object]:
    """Run the configured stages in order; returns a summary of what was produced."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "pipeline.resolved.yaml")
    summary: dict[str, object] = {}
    model_dir: Path | None = None
    if cfg.data is not None:
        from llm_pipeline.data.config import DataConfig
        from llm_pipeline.data.prepare import prepare

        data_cfg = load_config(DataConfig, cfg.data.config, cfg.data.set, output_dir=str(run_dir / "data"))
        summary["data"] = prepare(data_cfg)
        log.info("data: %s -> %s", summary["data"], data_cfg.packed_dir)
    if cfg.init is not None:
        model = build_model(get_preset(cfg.init.preset), seed=cfg.init.seed)
        model_dir = save_pretrained(model, run_dir / "init", metadata={"init_seed": cfg.init.seed})
        reloaded = load_pretrained(model_dir)
        probe = torch.arange(8)[None] % model.config.vocab_size
        with torch.no_grad():
            drift = (model(probe) - reloaded(probe)).abs().max().item()
        if drift > 1e-6:
            raise RuntimeError(f"HF round trip changed the model's logits by {drift}")
        log.info("init: %s preset -> %s (HF round trip exact)", cfg.init.preset, model_dir)
        summary["init"] = str(model_dir)
    if cfg.generate is not None and model_dir is not None:
        model = load_pretrained(model_dir)
        new = generate(model, [cfg.generate.prompt_ids], max_new_tokens=cfg.generate.max_new_tokens)[0]
        log.info("generate: %s -> %s", cfg.generate.prompt_ids, new)
        summary["generate"] = new
    return summary
