"""The model side of any training stage: materialise, parallelise, export.

Every stage (pretraining, SFT, DPO, LoRA) starts a model the same way (a preset with a seeded init,
or an HF directory), applies the same parallelism, and ends by exporting an HF directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llm_pipeline.config import ModelConfig
from llm_pipeline.train.config import ModelSource, ParallelConfig
from llm_pipeline.train.parallel import DistInfo, ModuleFilter, barrier, parallelize


def resolve_model_config(source: ModelSource) -> ModelConfig:
    """The architecture to train: read from ``init_from`` (an HF directory) or the preset."""
    if source.init_from is not None:
        from llm_pipeline.checkpoint.hf import read_model_config

        return read_model_config(source.init_from)
    return source.resolve()


_DIGESTS: dict[tuple, str] = {}


def start_model_digest(source: ModelSource, seed: int) -> str:
    """Identity of the start weights by content, not path: sha256 of the HF folder's ``config.json`` and
    weight files (names and bytes), or of a preset's config and seed.

    A model rewritten unchanged elsewhere is the same start; a folder whose files changed in place is not.
    The hash of a folder is remembered for the process while its files' sizes, mtimes and inodes stay the
    same: hashing a 7B model takes a while, and the pipeline, the runner and DPO's reference key all ask.
    """
    import json

    from llm_pipeline.config import config_to_dict
    from llm_pipeline.hashing import MODEL_FILE_PATTERNS, bytes_digest, files_digest

    if source.init_from is None:
        spec = {"preset_config": config_to_dict(source.resolve()), "seed": seed}
        return bytes_digest(json.dumps(spec, sort_keys=True))
    root = Path(source.init_from)
    files = sorted({f for pattern in MODEL_FILE_PATTERNS for f in root.glob(pattern) if f.is_file()})
    key = (str(root.resolve()), *((str(f), st.st_size, st.st_mtime_ns, st.st_ino) for f in files for st in [f.stat()]))
    if key not in _DIGESTS:
        _DIGESTS[key] = files_digest(files, root)
    return _DIGESTS[key]


def _full_model(model_cfg: ModelConfig, device: str | torch.device, *, init_from: Path | None, seed: int) -> nn.Module:
    """Fully materialised weights: the HF checkpoint in ``init_from`` or a seeded random init."""
    if init_from is not None:
        from llm_pipeline.checkpoint.hf import load_pretrained

        return load_pretrained(init_from, device=device)
    from llm_pipeline.model import build_model

    return build_model(model_cfg, device=device, seed=seed)


ModelTransform = Callable[[nn.Module], nn.Module]


def build_training_model(
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    info: DistInfo,
    *,
    precision: str,
    fp8: bool,
    seed: int = 0,
    init_from: Path | None = None,
    transform: ModelTransform | None = None,
    fp8_filter: ModuleFilter | None = None,
) -> nn.Module:
    """The model ready to train: weights loaded, ``transform`` applied, then float8 / AC / compile / FSDP2.

    ``transform`` (e.g. LoRA adapters) runs after the weights are loaded and before parallelisation;
    it must be deterministic and work on a ``meta`` model too. With several ranks every rank builds
    and transforms the model on the meta device and shards it; rank 0 then materialises the full
    weights once on CPU (transformed the same way) and broadcasts them into the shards, so the init
    is identical to a single-process run and no rank ever holds more than one full copy.
    """
    kwargs = dict(info=info, precision=precision, fp8=fp8, fp8_filter=fp8_filter)
    if not info.distributed:
        model = _full_model(model_cfg, info.device, init_from=init_from, seed=seed)
        if transform is not None:
            model = transform(model)
        with torch.no_grad():
            for p in model.parameters():
                # Trained weights are fp32 (bf16 is the autocast's compute dtype), as in FSDP2's shards, also when
                # ``init_from`` holds a bf16 export; frozen ones keep the dtype the transform chose (LoRA's base).
                if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
        return parallelize(model, parallel, **kwargs)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from llm_pipeline.model import build_model

    model = build_model(model_cfg, device="meta")
    if transform is not None:
        model = transform(model)
    parallelize(model, parallel, **kwargs)
    model.to_empty(device=info.device)
    full: dict[str, torch.Tensor] = {}
    if info.is_main:
        source = _full_model(model_cfg, "cpu", init_from=init_from, seed=seed)
        full = (transform(source) if transform is not None else source).state_dict()
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    )
    return model


def gather_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded CPU state dict (collective under FSDP; complete on rank 0)."""
    from llm_pipeline.checkpoint.dcp import full_model_state_dict

    return full_model_state_dict(model)


def write_hf_model(
    state: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    metadata: dict | None = None,
) -> Path:
    """An HF model directory from a plain LLaMA state dict (the full-model exporter)."""
    from llm_pipeline.checkpoint.hf import save_pretrained
    from llm_pipeline.model import build_model

    plain = build_model(model_cfg, device="meta")
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    return save_pretrained(plain, Path(out_dir), dtype=dtype, tokenizer_dir=tokenizer_dir, metadata=metadata)


def export_final_model(
    model: nn.Module,
    model_cfg: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Gather the (possibly sharded) weights and write an HF model directory from rank 0."""
    state = gather_model_state(model)
    out = Path(out_dir)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out = write_hf_model(state, model_cfg, out, tokenizer_dir=tokenizer_dir, dtype=dtype)
    barrier()
    return out
