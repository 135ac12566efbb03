"""Model folders written on request (``llm-pipeline init|export|import``): checks first, then one safe write.

Each command is one call here: the cheap refusals (a full machine, a folder that is not ours, the source
itself as the output) come before the slow load or build, and every folder is written through
:func:`~llm_pipeline.checkpoint.hf.save_pretrained` (checksummed, never over what it did not write).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from llm_pipeline import hardware
from llm_pipeline.checkpoint.dcp import (
    is_training_checkpoint,
)
from llm_pipeline.checkpoint.fsio import existing_ancestor, human_bytes
from llm_pipeline.checkpoint.hf import (
    DEFAULT_MAX_SHARD_BYTES,
    check_export_target,
    load_pretrained,
    parse_dtype,
    save_pretrained,
)
from llm_pipeline.config import ModelConfig

PathLike = str | os.PathLike[str]


class NotEnoughRoom(ValueError):
    """Not enough memory or disk for what was asked; refused before anything was allocated (one error line)."""


def check_room_to_build(cfg: ModelConfig, dtype: torch.dtype, output: PathLike) -> None:
    """Refuse before allocating: a 7B fp32 model on a 24 GiB machine would die in the allocator or the OOM killer."""
    from llm_pipeline.model.flops import count_parameters

    n = count_parameters(cfg)
    weights = n * dtype.itemsize
    need = weights + min(weights, DEFAULT_MAX_SHARD_BYTES) + 2**30  # + safetensors' copy of one shard + slack
    free = hardware.host_available_memory()
    hint = "use --preset tiny (7M parameters) to try things out"
    hint += ", --dtype bfloat16 to halve it" if dtype.itemsize > 2 else ""
    if free and need > free:
        raise NotEnoughRoom(
            f"init: {n:,} parameters in {str(dtype).replace('torch.', '')} need ~{human_bytes(need)} of RAM to "
            f"build and write, {human_bytes(free)} is available: {hint}, or a machine with more memory"
        )
    base = existing_ancestor(Path(output))
    if base.is_dir() and (disk := shutil.disk_usage(base).free) < weights:
        raise NotEnoughRoom(
            f"init: {output} needs ~{human_bytes(weights)} of disk, {human_bytes(disk)} is free there: {hint}, "
            "or write it somewhere larger"
        )


def init_model(
    cfg: ModelConfig,
    output: PathLike,
    *,
    seed: int = 0,
    dtype: str = "float32",
    tokenizer: PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """A randomly initialised model folder (with ``tokenizer``'s files), after the room to build it is checked."""
    from llm_pipeline.model.llama import build_model

    if tokenizer:
        from llm_pipeline.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(tokenizer).get_vocab_size()
        if vocab > cfg.vocab_size:
            raise ValueError(f"tokenizer has {vocab} tokens but the model's vocab_size is {cfg.vocab_size}")
    check_room_to_build(cfg, parse_dtype(dtype) or torch.float32, output)
    model = build_model(cfg, seed=seed, dtype=parse_dtype(dtype))
    return save_pretrained(model, output, tokenizer_dir=tokenizer, metadata={"init_seed": seed}, overwrite=overwrite)


def export_model(
    source: PathLike,
    output: PathLike,
    *,
    dtype: str = "auto",
    tokenizer: PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> tuple[Path, str]:
    """Write ``source`` (an HF model folder, a training checkpoint or a run's checkpoint folder) as an HF
    LLaMA folder; returns the folder and what was read. The target is checked before the (slow) load."""
    check_export_target(Path(output), overwrite=overwrite)
    refuse_same_folder(source, output)
    if is_training_checkpoint(source):
        from llm_pipeline.train.stage import load_checkpoint_for_export

        # the stage kind that wrote it loads it (a LoRA checkpoint: adapters merged into their base)
        model, ckpt, note, tok = load_checkpoint_for_export(source)
        what = f"training checkpoint {ckpt}" + (f" ({note})" if note else "")
        tok = tokenizer or tok
    else:
        model, what = load_pretrained(source), str(source)
        tok = tokenizer or (source if has_tokenizer(source) else None)
    out = save_pretrained(
        model, output, dtype=dtype, tokenizer_dir=tok, max_shard_bytes=max_shard_bytes, overwrite=overwrite
    )
    return out, what


def import_model(hf_dir: PathLike, output: PathLike, *, dtype: str = "auto", overwrite: bool = False) -> Path:
    """A LLaMA-architecture HF folder (e.g. a downloaded model) rewritten as one of ours, to start a stage from."""
    check_export_target(Path(output), overwrite=overwrite)
    refuse_same_folder(hf_dir, output)
    model = load_pretrained(hf_dir)
    return save_pretrained(
        model,
        output,
        dtype=dtype,
        tokenizer_dir=hf_dir if has_tokenizer(hf_dir) else None,
        metadata={"imported_from": str(Path(hf_dir).resolve())},
        overwrite=overwrite,
    )


def refuse_same_folder(source: PathLike, output: PathLike) -> None:
    """Writing a model over the folder it is read from would destroy the source on any failure."""
    src, out = Path(source).resolve(), Path(output).resolve()
    if src == out or src in out.parents:
        raise ValueError(f"{output}: the output must be a new folder outside the source {source}")


def has_tokenizer(path: PathLike) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
