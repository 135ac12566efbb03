"""A stage kind that exists only in the tests: one module, registered at test time with ``register_stage_kind``.

Trains on arithmetic progressions read from a JSONL file (``data.path``, one list of token ids per line) with
the toy stage's per-example objective. Its own hooks tell pre-flight what it reads (the file, present or
written by an earlier step, every id inside the vocabulary) and how long its rows are; everything else
(the pipeline's fingerprint, gate and promotion, export, the report) comes from the registry and the runner.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from llm_pipeline.config import ModelConfig, StrictModel
from llm_pipeline.hardware import Check
from llm_pipeline.train.batching import BatchSource
from llm_pipeline.train.config import StageConfig
from llm_pipeline.train.objectives import Objective
from llm_pipeline.train.parallel import DistInfo
from llm_pipeline.train.stage import Stage
from llm_pipeline.train.stage_inputs import InputContext, MemoryPlan

from .toy_stage import PerExampleObjective, ToyRowSource


class ArithData(StrictModel):
    path: Path = Field(description="JSONL file: one list of token ids per line")


class ArithConfig(StageConfig):
    batch_unit: ClassVar[str] = "sequences"
    default_output_dir: ClassVar[str] = "checkpoints/arith"

    data: ArithData


def read_examples(path: Path) -> list[np.ndarray]:
    return [np.asarray(json.loads(line), dtype=np.int64) for line in path.read_text().splitlines() if line.strip()]


class ArithStage(Stage):
    kind = "arith"
    config_class = ArithConfig
    cfg: ArithConfig

    def build_sources(self, info: DistInfo, model_cfg: ModelConfig) -> tuple[BatchSource, BatchSource | None]:
        src = ToyRowSource(n=1, seed=self.cfg.training.seed, rank=info.rank, world_size=info.world_size)
        src.examples = read_examples(self.cfg.data.path)
        return src, None

    def build_objective(self, model_cfg: ModelConfig) -> Objective:
        return PerExampleObjective()

    def input_checks(self, ctx: InputContext) -> list[Check]:
        out = super().input_checks(ctx)
        path, what = self.cfg.data.path, f"data: {ctx.name}"
        if ctx.writer(path) is not None:
            return [*out, Check(what, "ok", f"{path}: written by {ctx.writer(path)}")]
        if not path.is_file():
            return [*out, Check(what, "BLOCKER", f"{path}: not found; write one JSON list of token ids per line")]
        top = max(int(e.max(initial=0)) for e in read_examples(path))
        if ctx.model is not None and top >= ctx.model.vocab_size:
            return [*out, Check(what, "BLOCKER", f"{path}: token id {top} >= vocab_size {ctx.model.vocab_size}")]
        return [*out, Check(what, "ok", f"{path} (ids up to {top})")]

    def memory_plan(self, model_cfg: ModelConfig) -> MemoryPlan:
        longest = (
            max((len(e) for e in read_examples(self.cfg.data.path)), default=2) if self.cfg.data.path.is_file() else 2
        )
        return MemoryPlan(rows=self.cfg.training.micro_batch_size, seq_len=longest - 1)


def write_examples(path: Path, n: int = 24, vocab: int = 300, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        a, d, k = int(rng.integers(0, vocab)), int(rng.integers(1, 4)), int(rng.integers(6, 20))
        lines.append(json.dumps(((a + d * np.arange(k)) % vocab).tolist()))
    path.write_text("\n".join(lines) + "\n")
    return path


def arith_config_dict(data_path: Path, **training: Any) -> dict[str, Any]:
    train = {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "learning_rate": 3e-3, "warmup_steps": 1,
             "precision": "fp32", "logging_steps": 2, "eval_steps": 0, "save_steps": 2, "output_dir": "unused",
             **training}  # fmt: skip
    return {"model": {"preset": "debug"}, "data": {"path": str(data_path)}, "training": train,
            "parallel": {"device": "cpu", "fp8": False}}  # fmt: skip
