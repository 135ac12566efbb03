"""The pretraining stage: model + packed-token loader + causal-LM objective on the shared Trainer.

``run_pretraining(cfg)`` is the library entry point (the CLI, ``make demo`` and the pipeline call
it). It works the same on one CPU process and under ``torchrun`` on many GPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llm_pipeline.config import ModelConfig, save_config
from llm_pipeline.train.config import PretrainConfig
from llm_pipeline.train.model_setup import build_training_model, export_final_model, resolve_model_config
from llm_pipeline.train.objectives import CausalLMObjective
from llm_pipeline.train.parallel import DistInfo, init_distributed, resolve_fp8
from llm_pipeline.train.trainer import BatchSource, Callback, Trainer, TrainResult

log = logging.getLogger(__name__)


def build_sources(cfg: PretrainConfig, info: DistInfo) -> tuple[BatchSource, BatchSource | None]:
    """Train/val loaders over the packed shards (each rank reads its own slice of every batch)."""
    try:
        from llm_pipeline.data.loader import PackedTokenDataset, TokenBatchLoader
    except ImportError as e:  # pragma: no cover - the data package provides it
        raise ImportError(f"the packed-token loader is not available ({e}); install the data stage") from e
    root = cfg.data.path
    if not Path(root).exists():
        raise FileNotFoundError(
            f"data.path {root} does not exist; create it with `llm-pipeline data prepare --config "
            f"configs/data.yaml` (the CPU demo: configs/demo/data.yaml) or point data.path at packed shards"
        )
    first = cfg.curriculum[0].seq_len
    longest = max(s.seq_len for s in cfg.curriculum)
    kwargs: dict[str, Any] = dict(
        seq_len=first,
        # Chunks as long as the longest curriculum length: every length fits a chunk, and a global batch
        # draws from many random places in the corpus rather than reading one long stretch.
        chunk_len=longest,
        micro_batch_size=cfg.training.micro_batch_size,
        seed=cfg.training.seed,
        rank=info.rank,
        world_size=info.world_size,
    )
    train = TokenBatchLoader(PackedTokenDataset(root, split=cfg.data.train_split), **kwargs)
    val = None
    if cfg.training.eval_steps:
        try:
            val = TokenBatchLoader(PackedTokenDataset(root, split=cfg.data.val_split), **kwargs)
        except (FileNotFoundError, ValueError) as e:  # missing, empty, or too short for chunk x ranks
            log.warning("validation disabled: split '%s' under %s is unusable (%s)", cfg.data.val_split, root, e)
    return train, val


def check_vocabulary(src: BatchSource, model_cfg: ModelConfig) -> None:
    """Token ids beyond the embedding would crash deep inside the forward; say so up front."""
    manifest = getattr(getattr(src, "dataset", None), "manifest", None) or {}
    vocab = manifest.get("vocab_size")
    if vocab is not None and vocab > model_cfg.vocab_size:
        raise ValueError(
            f"the packed data uses a {vocab}-token vocabulary but the model has vocab_size "
            f"{model_cfg.vocab_size}; set model.overrides.vocab_size: {vocab} (or a matching preset)"
        )


def run_pretraining(
    cfg: PretrainConfig,
    *,
    train_source: BatchSource | None = None,
    val_source: BatchSource | None = None,
    callbacks: Sequence[Callback] = (),
    export: bool = True,
) -> TrainResult:
    """Pretrain per ``cfg``: resume if asked, train, checkpoint, export ``<output_dir>_final`` (HF)."""
    info = init_distributed(cfg.parallel.device)
    torch.manual_seed(cfg.training.seed)
    fp8 = resolve_fp8(cfg.parallel.fp8, info.device)
    model_cfg = resolve_model_config(cfg.model)
    if info.is_main:
        save_config(cfg, Path(cfg.training.output_dir) / "config.yaml")
    if train_source is None:
        train_source, built_val = build_sources(cfg, info)
        val_source = val_source or built_val
    check_vocabulary(train_source, model_cfg)
    model = build_training_model(
        model_cfg,
        cfg.parallel,
        info,
        precision=cfg.training.precision,
        fp8=fp8,
        seed=cfg.training.seed,
        init_from=cfg.model.init_from,
    )
    trainer = Trainer(
        model=model,
        objective=CausalLMObjective(z_loss_weight=cfg.training.z_loss_weight),
        train_source=train_source,
        val_source=val_source,
        cfg=cfg.training,
        info=info,
        curriculum=cfg.curriculum,
        model_config=model_cfg,
        run_config=cfg,
        callbacks=callbacks,
        fp8=fp8,
    )
    result = trainer.fit()
    if export and result.status == "completed":
        dtype = torch.bfloat16 if cfg.training.precision == "bf16" else None
        result.final_dir = export_final_model(
            model, model_cfg, cfg.training.resolved_final_dir, tokenizer_dir=cfg.data.tokenizer_dir, dtype=dtype
        )
    return result
