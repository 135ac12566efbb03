"""A second stage for the runner's tests: whole examples per row, a per-example objective, no loop code.

Examples are arithmetic progressions of varying length (mod the vocabulary), one per row, right
padded to the longest row of the micro-batch (``document_ids`` -1 on padding). The objective is
the mean token log-loss of each example (one unit per example, like a preference pair), through
the chunked :func:`token_logprobs`. Everything else (loop, resume, checkpoints, export) is the runner's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import nn

from llm_pipeline.config import ModelConfig, StrictModel
from llm_pipeline.model.flops import FlopModel
from llm_pipeline.train.config import StageConfig
from llm_pipeline.train.objectives import IGNORE_INDEX, BatchCost, Objective, ObjectiveOutput, token_logprobs
from llm_pipeline.train.parallel import DistInfo
from llm_pipeline.train.stage import Stage


class ToyRowSource:
    """Rows = whole examples; rank r takes examples r, r+W, ...; resumable; ``rows_per_epoch`` known."""

    def __init__(self, *, n: int = 64, vocab: int = 512, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.examples = []
        for _ in range(n):
            length = int(rng.integers(6, 30))
            a, d = int(rng.integers(0, vocab)), int(rng.integers(1, 4))
            self.examples.append(((a + d * np.arange(length)) % vocab).astype(np.int64))
        self.rank, self.world_size = rank, world_size
        self.micro = 1
        self.cursor = 0  # this rank's next example number (over epochs)

    @property
    def rows_per_epoch(self) -> int:
        return len(self.examples)

    def set_micro_batch_size(self, rows: int) -> None:
        self.micro = rows

    def next_batch(self) -> dict[str, torch.Tensor]:
        picks = []
        for _ in range(self.micro):
            i = (self.cursor * self.world_size + self.rank) % len(self.examples)
            picks.append(self.examples[i])
            self.cursor += 1
        width = max(len(e) - 1 for e in picks)
        ids = torch.zeros(len(picks), width, dtype=torch.long)
        labels = torch.full((len(picks), width), IGNORE_INDEX, dtype=torch.long)
        docs = torch.full((len(picks), width), -1, dtype=torch.long)
        for r, e in enumerate(picks):
            k = len(e) - 1
            ids[r, :k], labels[r, :k], docs[r, :k] = torch.from_numpy(e[:-1]), torch.from_numpy(e[1:]), 0
        return {"input_ids": ids, "labels": labels, "document_ids": docs}

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "micro": self.micro}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor, self.micro = state["cursor"], state["micro"]


class PerExampleObjective(Objective):
    """Mean token log-loss per example; one unit per example. Keeps a resumable count of examples seen."""

    def __init__(self) -> None:
        self.examples_seen = 0

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).any(dim=1).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        labels = batch["labels"]
        logp = model(batch["input_ids"], head_fn=lambda h, head: token_logprobs(head, h, labels, chunk_tokens=16))
        n = (labels != IGNORE_INDEX).sum(dim=1).clamp_min(1)
        per_example = -logp.sum(dim=1) / n  # [B]
        if model.training:
            self.examples_seen += self.count(batch)
        return ObjectiveOutput(loss_sum=per_example.sum(), metric_sums={"example_loss": per_example.detach().sum()})

    def cost(self, batch: dict[str, torch.Tensor], flops: FlopModel) -> BatchCost:
        real = batch["document_ids"] >= 0
        lengths = real.sum(dim=1)
        tokens = int(lengths.sum())
        pairs = int((lengths * lengths).sum())
        logits = int((batch["labels"] != IGNORE_INDEX).sum())
        return BatchCost(tokens, flops.training(tokens=tokens, logit_tokens=logits, attention_pairs=pairs))

    def state_dict(self) -> dict[str, Any]:
        return {"examples_seen": self.examples_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.examples_seen = state["examples_seen"]


class ToyData(StrictModel):
    examples: int = Field(64, gt=0)
    freeze_blocks: bool = Field(False, description="freeze every block (only embeddings, final norm and head train)")


class ToyConfig(StageConfig):
    batch_unit: ClassVar[str] = "sequences"
    default_output_dir: ClassVar[str] = "checkpoints/toy"

    data: ToyData = Field(default_factory=ToyData)


class ToyStage(Stage):
    kind = "toy"
    config_class = ToyConfig
    cfg: ToyConfig

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__(cfg)
        self.objective = PerExampleObjective()

    @property
    def save_frozen_params(self) -> bool:  # type: ignore[override]
        return not self.cfg.data.freeze_blocks

    def build_sources(self, info: DistInfo, model_cfg: ModelConfig):
        t, data = self.cfg.training, self.cfg.data
        src = ToyRowSource(n=data.examples, seed=t.seed, rank=info.rank, world_size=info.world_size)
        return src, None

    def build_objective(self, model_cfg: ModelConfig) -> Objective:
        return self.objective

    def transform(self, model: nn.Module) -> nn.Module:
        if self.cfg.data.freeze_blocks:
            for p in model.model.layers.parameters():
                p.requires_grad_(False)
        return model


def toy_config(tmp_path: Path, **training: Any) -> ToyConfig:
    data = training.pop("data", {})
    train = {
        "max_steps": 6, "global_batch_size": 4, "micro_batch_size": 2, "learning_rate": 3e-3, "warmup_steps": 1,
        "precision": "fp32", "logging_steps": 1, "eval_steps": 0, "save_steps": 0,
        "output_dir": str(tmp_path / "ckpt"), "logging_dir": str(tmp_path / "logs"),
    }  # fmt: skip
    train.update(training)
    return ToyConfig.model_validate(
        {"model": {"preset": "debug"}, "training": train, "parallel": {"device": "cpu", "fp8": False}, "data": data}
    )
