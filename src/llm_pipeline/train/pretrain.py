"""The pretraining stage: packed-token windows + causal-LM objective + context-length curriculum.

The smallest complete stage on the runner (:mod:`llm_pipeline.train.stage`): a config, the token
loader as batch source, the objective and the token batching; the runner does the rest.
``run_pretraining(cfg)`` is the library entry point (the CLI, ``make demo`` and the pipeline call it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_pipeline.config import ModelConfig
from llm_pipeline.hardware import Check
from llm_pipeline.train.batching import Batching, BatchSource, TokenBatching
from llm_pipeline.train.config import PretrainConfig, PretrainDataConfig
from llm_pipeline.train.objectives import CausalLMObjective, Objective
from llm_pipeline.train.parallel import DistInfo
from llm_pipeline.train.stage import Stage, WiringContext, run_stage
from llm_pipeline.train.stage_inputs import InputContext, MemoryPlan, packed_data_checks
from llm_pipeline.train.trainer import Callback, TrainResult

log = logging.getLogger(__name__)


def build_sources(cfg: PretrainConfig, info: DistInfo) -> tuple[BatchSource, BatchSource | None]:
    """Train/val loaders over the packed shards (each rank reads its own slice of every batch); with
    ``data.sources``, a token-level weighted mixture of one loader per source and their held-out splits."""
    t = cfg.training

    def one(data: PretrainDataConfig) -> tuple[BatchSource, BatchSource | None]:
        return token_loaders(
            data.path,
            data.train_split,
            data.val_split if t.eval_steps else None,
            seq_len=cfg.curriculum[0].seq_len,
            # Chunks as long as the longest curriculum length: every length fits a chunk, and a global batch
            # draws from many random places in the corpus rather than reading one long stretch.
            chunk_len=max(s.seq_len for s in cfg.curriculum),
            micro_batch_size=t.micro_batch_size,
            seed=t.seed,
            info=info,
        )

    if not cfg.data.sources:
        return one(cfg.data)
    from llm_pipeline.data.mixing import build_mixture

    return build_mixture(cfg.data, lambda name, data: one(data), unit="tokens", seed=t.seed, rank=info.rank)


def token_loaders(
    root: Path,
    train_split: str,
    val_split: str | None,
    *,
    seq_len: int,
    chunk_len: int,
    micro_batch_size: int,
    seed: int,
    info: DistInfo,
) -> tuple[BatchSource, BatchSource | None]:
    """Loaders of one packed dataset's train split and (``val_split`` given and usable) its validation split.

    Every token stage reads its shards through here (pretraining; LoRA's domain and general data).
    """
    from llm_pipeline.data.loader import PackedTokenDataset, TokenBatchLoader

    if not Path(root).exists():
        raise FileNotFoundError(
            f"packed data {root} does not exist; create it with `llm-pipeline data prepare --config "
            f"configs/data.yaml` (the CPU demo: configs/demo/data.yaml) or point the config at packed shards"
        )
    kwargs: dict[str, Any] = dict(
        seq_len=seq_len,
        chunk_len=chunk_len,
        micro_batch_size=micro_batch_size,
        seed=seed,
        rank=info.rank,
        world_size=info.world_size,
    )
    train = TokenBatchLoader(PackedTokenDataset(root, split=train_split), **kwargs)
    val = None
    if val_split is not None:
        try:
            val = TokenBatchLoader(PackedTokenDataset(root, split=val_split), **kwargs)
        except (FileNotFoundError, ValueError) as e:  # missing, empty, or too short for chunk x ranks
            log.warning("validation disabled: split '%s' under %s is unusable (%s)", val_split, root, e)
    return train, val


def check_vocabulary(src: BatchSource, model_cfg: ModelConfig) -> None:
    """Token ids beyond the embedding would crash deep inside the forward; say so up front."""
    for part in getattr(src, "sources", {}).values():  # a mixture: every source
        check_vocabulary(part, model_cfg)
    manifest = getattr(getattr(src, "dataset", None), "manifest", None) or {}
    vocab = manifest.get("vocab_size")
    if vocab is not None and vocab > model_cfg.vocab_size:
        raise ValueError(
            f"the packed data uses a {vocab}-token vocabulary but the model has vocab_size "
            f"{model_cfg.vocab_size}; set model.overrides.vocab_size: {vocab} (or a matching preset)"
        )


class PretrainStage(Stage):
    kind = "pretrain"
    config_class = PretrainConfig
    cfg: PretrainConfig

    def build_sources(self, info: DistInfo, model_cfg: ModelConfig) -> tuple[BatchSource, BatchSource | None]:
        return build_sources(self.cfg, info)

    def build_objective(self, model_cfg: ModelConfig) -> Objective:
        t = self.cfg.training
        return CausalLMObjective(z_loss_weight=t.z_loss_weight, chunk_tokens=t.loss_chunk_tokens)

    def batching(self) -> Batching:
        t = self.cfg.training
        return TokenBatching(t.global_batch_tokens, t.micro_batch_size, self.cfg.curriculum)

    def check_data(self, train_source: BatchSource, model_cfg: ModelConfig) -> None:
        check_vocabulary(train_source, model_cfg)

    def tokenizer_dir(self) -> Path | None:
        return self.cfg.data.tokenizer_dir or super().tokenizer_dir()

    def input_checks(self, ctx: InputContext) -> list[Check]:
        d = self.cfg.data
        fix = "run `llm-pipeline data prepare --config configs/data.yaml` (the CPU demo: configs/demo/data.yaml)"
        out = super().input_checks(ctx)
        for name, src in (d.source_configs() if d.sources else {"": d}).items():
            what = f"data: {ctx.name}" + (f" ({name})" if name else "")
            out += packed_data_checks(ctx, Path(src.path), [src.train_split], what, fix, ctx.model)
        if d.tokenizer_dir is not None:
            out.append(ctx.tokenizer(d.tokenizer_dir))
        return out

    def memory_plan(self, model_cfg: ModelConfig) -> MemoryPlan:
        # later curriculum stages keep the first one's tokens per micro-batch
        first, longest = self.cfg.curriculum[0].seq_len, max(c.seq_len for c in self.cfg.curriculum)
        return MemoryPlan(rows=max(1, self.cfg.training.micro_batch_size * first // longest), seq_len=longest)

    @classmethod
    def pipeline_wiring(cls, ctx: WiringContext) -> dict[str, Any]:
        if ctx.packed_dir is None or ctx.tokenizer_dir is None:
            return {}
        return {"data.path": str(ctx.packed_dir), "data.tokenizer_dir": str(ctx.tokenizer_dir)}


def run_pretraining(
    cfg: PretrainConfig,
    *,
    train_source: BatchSource | None = None,
    val_source: BatchSource | None = None,
    callbacks: Sequence[Callback] = (),
    export: bool = True,
) -> TrainResult:
    """Pretrain per ``cfg``: resume if asked, train, checkpoint, export ``<output_dir>_final`` (HF)."""
    return run_stage(
        PretrainStage(cfg), train_source=train_source, val_source=val_source, callbacks=callbacks, export=export
    )
