"""HF ``transformers`` format: our model directories are plain HF LLaMA directories.

Parameter names are identical on both sides, so export and import are state-dict copies; this
module only translates ``config.json``, shards safetensors and refuses what it cannot represent
faithfully. Weights are read and written as safetensors only: nothing is ever unpickled.

Every export (HF model, LoRA adapter, merged model) carries a ``checksums.sha256`` of its files, written
with it (``sha256sum -c`` format, as a training checkpoint's); :func:`load_pretrained` checks it before it
reads a weight, and ``llm-pipeline ckpt verify|list --verify|archive`` check it too.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llm_pipeline import __version__
from llm_pipeline.checkpoint import checksums
from llm_pipeline.checkpoint.checksums import ChecksumMismatch
from llm_pipeline.checkpoint.fsio import check_free_space, fsync_path, write_text_synced
from llm_pipeline.config import ConfigError, ModelConfig, config_to_dict
from llm_pipeline.errors import ExplainedOSError, explain_os_error
from llm_pipeline.model.llama import LlamaForCausalLM, build_model

log = logging.getLogger(__name__)

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
EXPORT_KIND = "hf_model"  # llm_pipeline.json "kind" of a full HF model directory
_TMP_TAG = "tmp-"  # .<name>.tmp-<pid>-<random>: an export being written
_OLD_TAG = "old-"  # .<name>.old-<pid>: the previous export, moved aside for a moment
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
    overwrite: bool = False,
    kind: str = EXPORT_KIND,
) -> Path:
    """Write an HF LLaMA directory through :func:`write_export` (never destroying what it did not write).

    Shards above ``max_shard_bytes`` with a ``model.safetensors.index.json``; copies tokenizer
    files from ``tokenizer_dir``; records our own metadata and the model config in ``llm_pipeline.json``.
    """
    cfg = model.config
    target = parse_dtype(dtype) or next(model.parameters()).dtype
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # HF stores tied weights once, under the embedding
        state[name] = tensor.detach().to(device="cpu", dtype=target).contiguous()

    def write(tmp: Path) -> None:
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
                shutil.copyfile(tok_dir / f, tmp / f)
            gen_cfg.update(_special_token_ids(tmp))
        _write_json(tmp / "generation_config.json", gen_cfg)

    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    metadata = {"model_config": config_to_dict(cfg), **(metadata or {})}
    return write_export(out_dir, write, kind=kind, metadata=metadata, overwrite=overwrite, needed_bytes=nbytes)


def write_export(
    out_dir: str | os.PathLike[str],
    write: Callable[[Path], None],
    *,
    kind: str,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    needed_bytes: int = 0,
) -> Path:
    """Write an export folder safely: every exporter (HF models, LoRA adapters) goes through here.

    ``write(tmp)`` fills a temp folder beside ``out_dir``; ``llm_pipeline.json`` then records ``kind``,
    ``metadata`` and the files written; everything is fsynced and renamed into place. The target may be
    new, empty, or a previous export of the same ``kind`` (replaced: how a stage rewrites its outputs).
    Any other non-empty folder is refused unless ``overwrite``, and even then only the files this export
    writes are replaced; a folder holding training checkpoints is always refused (:func:`check_export_target`).
    """
    out = Path(out_dir)
    clean_export_leftovers(out)
    plan = check_export_target(out, overwrite=overwrite, kind=kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(out.parent, needed_bytes + (1 << 20), out.name, "Free some space or export somewhere else")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_TMP_TAG}{os.getpid()}-", dir=out.parent))
    mode = 0o666 & ~_umask()
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a model directory is not
    try:
        write(tmp)
        written = sorted(p.name for p in tmp.iterdir())
        files = sorted([*written, METADATA_FILE, checksums.MANIFEST])
        _write_json(
            tmp / METADATA_FILE,
            {"llm_pipeline_version": __version__, "kind": kind, "files": files, **(metadata or {})},
        )
        # Hashed from the page cache just written: damage from here on is found by every reader.
        checksums.write_manifest(tmp, [n for n in [*written, METADATA_FILE] if (tmp / n).is_file()])
        for f in tmp.iterdir():
            os.chmod(f, mode)  # safetensors writes 0600; a model is as readable as its siblings
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_path(tmp)
        if plan == "merge":
            _merge_into(tmp, out, files)
        elif out.exists() and any(out.iterdir()):
            old = out.with_name(f".{out.name}.{_OLD_TAG}{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)  # a crash from here on: clean_export_leftovers puts `old` back
            tmp.rename(out)
            fsync_path(out.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)  # also over an empty folder
        fsync_path(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        code = re.search(r"\(os error (\d+)\)", str(e)) if isinstance(e, SafetensorError) else None
        if code:  # safetensors reports a full disk as a SafetensorError naming the OS error
            os_error = OSError(int(code.group(1)), os.strerror(int(code.group(1))))
            raise ExplainedOSError(os_error.errno or 0, explain_os_error(os_error, f"writing {out}")) from None
        raise
    return out


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _read_export_meta(folder: Path) -> dict[str, Any] | None:
    """Our ``llm_pipeline.json`` in ``folder``, or None when the folder is not one of our exports."""
    try:
        data = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "llm_pipeline_version" in data else None


def _export_file_names(meta: Mapping[str, Any]) -> set[str]:
    """Files a previous export wrote: its own list, or (older exports) every name an export can write."""
    files = meta.get("files")
    if isinstance(files, list):
        return {str(f) for f in files}
    return {*TOKENIZER_FILES, "config.json", "generation_config.json", METADATA_FILE, "model.safetensors",
            "model.safetensors.index.json"}  # fmt: skip


def read_export_manifest(folder: str | os.PathLike[str]) -> dict[str, str] | None:
    """name -> sha256 of an export's files (its ``checksums.sha256``), or None when there is nothing to check
    against: a folder llm-pipeline did not write, or an export written before exports had checksums.

    Raises :class:`ChecksumMismatch` for a manifest that is unreadable, or missing although the export's
    ``llm_pipeline.json`` lists it, and for an export whose writing never finished.
    """
    folder = Path(folder)
    meta = _read_export_meta(folder)
    if meta is not None and meta.get("incomplete"):
        raise ChecksumMismatch(f"{METADATA_FILE}: an export that never finished writing (marked incomplete)")
    sums = checksums.read_manifest(folder)
    if sums is None and meta is not None and checksums.MANIFEST in _export_file_names(meta):
        raise ChecksumMismatch(f"{checksums.MANIFEST}: missing (this export wrote one, listed in {METADATA_FILE})")
    return sums


def export_problems(folder: str | os.PathLike[str], *, full: bool = True, workers: int = 4) -> list[str] | None:
    """What is wrong with an export's files: ``[]`` when none, ``None`` when it has no checksums to check.

    ``full=False`` only checks that the manifest is readable and every file it lists is present (no reading).
    """
    folder = Path(folder)
    try:
        sums = read_export_manifest(folder)
    except ChecksumMismatch as e:
        return [str(e)]
    if sums is None:
        return None
    if not full:
        return [f"{name}: missing" for name in sorted(sums) if not (folder / name).is_file()]
    return checksums.verify(folder, sums, workers=workers)


def verify_export(folder: str | os.PathLike[str]) -> bool:
    """Hash an export's files against its manifest: True when verified, False when it has none (older export,
    or not ours). Raises :class:`ChecksumMismatch` naming the damaged files and what to do."""
    problems = export_problems(folder)
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ChecksumMismatch(
            f"{folder}: damaged since it was exported ({'; '.join(problems[:3])}{more}); export it again from its "
            "training checkpoint (llm-pipeline export CHECKPOINT OUTPUT) or restore it from an archive"
        )
    return problems is not None


def _holds_training_checkpoints(folder: Path) -> bool:
    if any((folder / n).exists() for n in ("COMMITTED", ".metadata", "trainer_state.pt", ".llm_pipeline.lock")):
        return True
    return any(p.name.startswith(("checkpoint-", ".tmp-checkpoint-")) and p.is_dir() for p in folder.iterdir())


def check_export_target(out: Path, *, overwrite: bool, kind: str = EXPORT_KIND) -> str:
    """How an export may write ``out``: ``"new"``, ``"replace"`` (a previous export of the same kind
    and nothing else) or ``"merge"`` (write only our files into a folder that holds others too).

    Raises ``FileExistsError`` for a folder that is not ours unless ``overwrite``, and always for a
    file, a folder of training checkpoints, or a folder whose other weight files would mix with ours.
    """
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder; choose another output path")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return "new"
    if _holds_training_checkpoints(out):
        raise FileExistsError(
            f"{out} holds training checkpoints (a run's output folder); an export never writes there, "
            "even with --overwrite: choose another output folder"
        )
    meta = _read_export_meta(out)
    if meta is not None and meta.get("kind", EXPORT_KIND) == kind:
        ours = _export_file_names(meta)
        return "replace" if entries <= ours else "merge"
    if not overwrite:
        what = f"a {meta.get('kind')} export" if meta is not None else f"not a previous export (no {METADATA_FILE})"
        raise FileExistsError(
            f"{out} is not empty and is {what}; pass --overwrite to write the model files into it "
            "(its other files are kept), or choose an empty or new folder"
        )
    weights = sorted(n for n in entries if n.endswith(".safetensors") or n == "model.safetensors.index.json")
    if weights:
        raise FileExistsError(
            f"{out} already holds other model weights ({', '.join(weights[:3])}); writing ours beside them "
            "would mix two models: remove them or choose another folder"
        )
    return "merge"


def _merge_into(tmp: Path, out: Path, files: list[str]) -> None:
    """Move our files into ``out`` one by one (each atomically), leaving every other file alone.

    The metadata goes first, marked incomplete and listing old and new files, so a crash midway
    still leaves a folder recognised as ours (the next export replaces it); the final one goes last.
    """
    previous = _read_export_meta(out)
    stale = (_export_file_names(previous) - set(files)) if previous is not None else set()
    interim = json.loads((tmp / METADATA_FILE).read_text(encoding="utf-8"))
    interim.update(incomplete=True, files=sorted(set(files) | stale))
    _write_json(out / METADATA_FILE, interim)
    for name in files:
        if name != METADATA_FILE:
            os.replace(tmp / name, out / name)
    for name in stale:  # files the previous export wrote and this one does not (e.g. old shards)
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    os.replace(tmp / METADATA_FILE, out / METADATA_FILE)
    fsync_path(out)
    shutil.rmtree(tmp, ignore_errors=True)


def clean_export_leftovers(out: str | os.PathLike[str]) -> None:
    """Remove temp folders an interrupted export of ``out`` left beside it; put a moved-aside export back.

    ``.<name>.old-<pid>`` is the previous export, moved aside just before the new one took its place:
    if the crash came in between, it is restored. Folders of a process still running are left alone.
    """
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return
    for p in sorted(parent.glob(f".{glob.escape(out.name)}.*-*")):
        rest = p.name[len(out.name) + 2 :]
        tag = next((t for t in (_TMP_TAG, _OLD_TAG) if rest.startswith(t)), None)
        if tag is None or not p.is_dir():
            continue
        pid = rest[len(tag) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_running(int(pid)):
            continue
        if tag == _OLD_TAG and not out.exists() and ((p / METADATA_FILE).is_file() or (p / "config.json").is_file()):
            log.warning("restoring %s, moved aside by an export that did not finish", out)
            p.rename(out)
            continue
        log.info("removing %s, left behind by an interrupted export", p)
        shutil.rmtree(p, ignore_errors=True)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is not running
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X")
    except OSError:
        return True


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
    """Load any HF LLaMA-architecture directory (ours, Llama, TinyLlama...) into our model.

    An export of ours is hashed against its ``checksums.sha256`` first (:func:`verify_export`): every weight
    is read anyway, so the check costs CPU only (the bytes are then served from the page cache), and a flipped
    bit fails here, naming the file, instead of training or evaluating on damaged weights.
    """
    root = Path(model_dir)
    if (root / "config.json").is_file():
        verify_export(root)
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
