"""HF ``transformers`` format: our model directories are plain HF LLaMA directories.

Parameter names are identical on both sides, so export and import are state-dict copies; this
module only translates ``config.json``, shards safetensors and refuses what it cannot represent
faithfully. Weights are read and written as safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llm_pipeline import __version__
from llm_pipeline.checkpoint.fsio import fsync_path, write_text_synced
from llm_pipeline.config import ConfigError, ModelConfig, config_to_dict
from llm_pipeline.model.llama import LlamaForCausalLM, build_model

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
METADATA_FILE = "llm_pipeline.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` -> ``torch.bfloat16``; ``None``/``"auto"`` -> ``None``."""
    if name is None or isinstance(name, torch.dtype):
        return name
    alias = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    key = alias.get(name.lower(), name.lower())
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of: auto, float32, bfloat16, float16")
    return _DTYPES[key]


def model_config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate an HF LLaMA ``config.json`` mapping; anything we cannot run exactly is an error."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type is None and archs[:1] == ["LlamaForCausalLM"]:
        model_type = "llama"
    if model_type != "llama" or (archs and archs[0] != "LlamaForCausalLM"):
        found = archs[0] if archs else model_type
        raise ConfigError(
            f"{source}: unsupported architecture {found!r}; only LLaMA-architecture checkpoints "
            "(model_type 'llama', LlamaForCausalLM) can be imported"
        )
    problems = []
    if hf.get("attention_bias"):
        problems.append("attention_bias=true (our attention has no biases)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true (our MLP has no biases)")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers maps both to SiLU
        problems.append(f"hidden_act={hf.get('hidden_act')!r} (only 'silu' is supported)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} if rope else None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        problems.append(f"rope scaling {scaling!r} (only plain RoPE is supported)")
    if problems:
        raise ConfigError(f"{source}: cannot import this checkpoint exactly: " + "; ".join(problems))
    heads = hf.get("num_attention_heads")
    hidden = hf.get("hidden_size")
    head_dim = hf.get("head_dim")
    if head_dim is not None and heads and hidden and head_dim == hidden // heads:
        head_dim = None
    fields = {
        "vocab_size": hf.get("vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": hf.get("intermediate_size"),
        "num_hidden_layers": hf.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads if hf.get("num_key_value_heads") is None else hf["num_key_value_heads"],
        "head_dim": head_dim,
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "rope_theta": hf.get("rope_theta") or rope.get("rope_theta") or 10000.0,
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "initializer_range": hf.get("initializer_range", 0.02),
    }
    missing = [k for k, v in fields.items() if v is None and k != "head_dim"]
    if missing:
        raise ConfigError(f"{source}: missing required keys: {', '.join(missing)}")
    try:
        return ModelConfig.model_validate(fields)
    except Exception as e:  # pydantic ValidationError: keep the message, name the file
        raise ConfigError(f"{source}: invalid LLaMA config: {e}") from None


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` for ``transformers.LlamaForCausalLM`` (v4 and v5 both read these keys)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def _write_json(path: Path, data: Any) -> None:
    write_text_synced(path, json.dumps(data, indent=2) + "\n")


def _shard(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_pretrained(
    model: LlamaForCausalLM,
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write an HF LLaMA directory atomically (temp folder, fsync, rename).

    Shards above ``max_shard_bytes`` with a ``model.safetensors.index.json``; copies tokenizer
    files from ``tokenizer_dir``; records our own metadata in ``llm_pipeline.json``.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (or --overwrite) to replace it")
    cfg = model.config
    target = parse_dtype(dtype) or next(model.parameters()).dtype
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # HF stores tied weights once, under the embedding
        state[name] = tensor.detach().to(device="cpu", dtype=target).contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a model directory is not
    try:
        shards = _shard(state, max_shard_bytes)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            _write_json(
                tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
            )
        _write_json(tmp / "config.json", hf_config_dict(cfg, target))
        gen_cfg: dict[str, Any] = {"_from_model_config": True, "do_sample": False}
        if tokenizer_dir is not None:
            tok_dir = Path(tokenizer_dir)
            if tok_dir.is_file():
                tok_dir = tok_dir.parent
            copied = [f for f in TOKENIZER_FILES if (tok_dir / f).is_file()]
            if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
                raise FileNotFoundError(f"{tok_dir}: no tokenizer.json or tokenizer.model to copy")
            for f in copied:
                shutil.copy2(tok_dir / f, tmp / f)
            gen_cfg.update(_special_token_ids(tmp))
        _write_json(tmp / "generation_config.json", gen_cfg)
        _write_json(
            tmp / METADATA_FILE,
            {"llm_pipeline_version": __version__, "model_config": config_to_dict(cfg), **(metadata or {})},
        )
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_path(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _special_token_ids(model_dir: Path) -> dict[str, int | list[int]]:
    """bos/eos/pad ids for generation_config.json, read from the tokenizer files just copied.

    With a chat template, its end-of-turn token (``<|end|>``, ``<|eot_id|>``, ...) joins ``eos_token_id``,
    so ``transformers``' ``generate`` stops a chat reply at the end of the turn, as our generator does.
    """
    # The template reader lives with the data code; here it only reads the files just copied.
    from llm_pipeline.data.chat import end_of_turn_token, read_chat_template, special_tokens_map

    ids: dict[str, int | list[int]] = {}
    tok_file = model_dir / "tokenizer.json"
    cfg_file = model_dir / "tokenizer_config.json"
    if not (tok_file.is_file() and cfg_file.is_file()):
        return ids
    added = json.loads(tok_file.read_text(encoding="utf-8")).get("added_tokens", [])
    vocab = {t["content"]: t["id"] for t in added}
    names = special_tokens_map(model_dir)
    for key in ("bos_token", "eos_token", "pad_token"):
        if names.get(key) in vocab:
            ids[f"{key}_id"] = vocab[names[key]]
    template = read_chat_template(model_dir)
    if template is not None:
        end = end_of_turn_token(template, [t["content"] for t in added if t.get("special")], names)
        eos = ids.get("eos_token_id")
        if end in vocab and vocab[end] != eos:
            ids["eos_token_id"] = [vocab[end]] if eos is None else [eos, vocab[end]]
    return ids


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ConfigError(
            f"{model_dir}: only pickle weights (*.bin/*.pt) found; they are never unpickled here. "
            "Convert them to safetensors first (e.g. transformers' save_pretrained(safe_serialization=True))."
        )
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def read_model_config(model_dir: str | os.PathLike[str]) -> ModelConfig:
    """The ``ModelConfig`` of an HF LLaMA directory, without touching its weights."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable JSON: {e}") from None
    return model_config_from_hf(hf, str(path))


def load_pretrained(
    model_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> LlamaForCausalLM:
    """Load any HF LLaMA-architecture directory (ours, Llama, TinyLlama...) into our model."""
    root = Path(model_dir)
    cfg = read_model_config(root)
    model = build_model(cfg, device="meta")
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    state: dict[str, torch.Tensor] = {}
    target = parse_dtype(dtype)
    for f in _weight_files(root):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: weight shard listed in the index is missing")
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    if name.endswith("rotary_emb.inv_freq"):
                        continue  # older HF checkpoints saved this buffer; we recompute it
                    if cfg.tie_word_embeddings and name == "lm_head.weight":
                        continue
                    t = sf.get_tensor(name)
                    state[name] = t.to(target) if target is not None else t
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:
            raise ConfigError(f"{f}: corrupt or unreadable safetensors file: {e}") from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"{root}: weights do not match the LLaMA layout in config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ConfigError(
                f"{root}: {name} has shape {tuple(t.shape)}, config.json implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    model.tie_weights()
    return model.to(device)
