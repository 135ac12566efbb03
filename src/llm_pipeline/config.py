"""Typed, strict configuration: every YAML file is validated by a pydantic model.

Unknown keys, wrong types and impossible values are errors that name the file, the key and what
is allowed, so a typo such as ``max_stpes`` never becomes a silent default. CLI overrides
(``--set section.key=value`` and the dedicated flags) go through the same validation, and the
resolved config is written beside every output.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says where and how."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are rejected, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


S = TypeVar("S", bound=BaseModel)


class ModelConfig(StrictModel):
    """LLaMA architecture hyper-parameters; field names follow HF ``LlamaConfig``."""

    vocab_size: int = Field(50304, gt=0, description="Embedding rows (padded tokenizer vocabulary).")
    hidden_size: int = Field(4096, gt=0, description="Residual stream width.")
    intermediate_size: int = Field(14336, gt=0, description="SwiGLU inner width.")
    num_hidden_layers: int = Field(32, gt=0, description="Transformer blocks.")
    num_attention_heads: int = Field(32, gt=0, description="Query heads.")
    num_key_value_heads: int = Field(8, gt=0, description="Key/value heads (GQA); divides query heads.")
    head_dim: int | None = Field(None, gt=0, description="Per-head width; default hidden/heads.")
    max_position_embeddings: int = Field(4096, gt=0, description="Longest context the model is built for.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    rms_norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    tie_word_embeddings: bool = Field(False, description="Share embed_tokens and lm_head weights.")
    initializer_range: float = Field(0.02, gt=0, description="Std of the normal init.")

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}), or head_dim must be set"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"head_dim ({self.resolved_head_dim}) must be even for RoPE")
        return self

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


# --------------------------------------------------------------------------------------------
# Loading, overriding, validating, saving
# --------------------------------------------------------------------------------------------


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text: {e}") from e
    if data is None:  # an empty file (or only comments) is a mistake, not "use every default"
        raise ConfigError(
            f"{p}: the config file is empty; write the settings into it, or leave the option out to use the defaults"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML: numbers, bools, lists...)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. training.max_steps=100")
    key, raw = item.split("=", 1)
    parts = [k for k in key.strip().split(".") if k]
    if not parts:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _list_item(items: list[Any], key: str, dotted: str) -> dict[str, Any]:
    """A list entry by index (``stages.0``) or by its ``name`` (``stages.sft``)."""
    if key.isdigit() and int(key) < len(items):
        item = items[int(key)]
    else:
        named = [x for x in items if isinstance(x, dict) and x.get("name") == key]
        if not named:
            names = [x.get("name") for x in items if isinstance(x, dict) and "name" in x]
            raise ConfigError(
                f"override {dotted}: no entry {key!r} in this list (use an index 0..{len(items) - 1}"
                + (f" or a name: {', '.join(map(str, names))})" if names else ")")
            )
        item = named[0]
    if not isinstance(item, dict):
        raise ConfigError(f"override {dotted}: entry {key!r} is a value, not a section")
    return item


def set_nested(data: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set ``data[k0][k1]...[kn] = value``, creating sections on the way.

    A list of sections is addressed by index or by an entry's ``name`` (``stages.sft.set``).
    """
    node: Any = data
    dotted = ".".join(keys)
    for k in keys[:-1]:
        if isinstance(node, list):
            node = _list_item(node, k, dotted)
            continue
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict | list):
            raise ConfigError(f"override {dotted}: '{k}' is a value, not a section")
        node = nxt
    if isinstance(node, list):
        raise ConfigError(f"override {dotted}: name a field of a list entry, e.g. {dotted}.config=...")
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str] = (), **flat: Any) -> dict[str, Any]:
    """Apply ``--set`` strings and dotted keyword overrides (``None`` values are skipped)."""
    for item in overrides:
        keys, value = parse_override(item)
        set_nested(data, keys, value)
    for dotted, value in flat.items():
        if value is not None:
            set_nested(data, dotted.split("."), value)
    return data


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config models an annotation holds (``X``, ``X | None``, ``Annotated[X | Y, ...]``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _is_tag(model: type[BaseModel], part: str) -> bool:
    """``part`` is ``model``'s discriminator value (pydantic puts it in the location of a tagged union member)."""
    return any(get_args(f.annotation) == (part,) for f in model.model_fields.values())


def _keys(model: type[BaseModel]) -> dict[str, Any]:
    """A model's keys and their annotations, with those it validates itself (``extra_fields()``: eval task sections)."""
    extra = getattr(model, "extra_fields", None)
    return {**{k: f.annotation for k, f in model.model_fields.items()}, **(extra() if callable(extra) else {})}


def _walk(schema: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], list[str]]:
    """(the user's key path of ``loc``, without union tags; field names of the model holding ``loc[-1]``)."""
    models: list[type[BaseModel]] = [schema]
    path: list[str] = []
    for part in loc[:-1]:
        path.append(str(part))
        if isinstance(part, int):
            continue
        field = next((_keys(m)[part] for m in models if part in _keys(m)), None)
        if field is not None:
            models = _models_in(field)
            continue
        member = [m for m in models if part == m.__name__ or _is_tag(m, str(part))]
        if member:  # not a key the user wrote: the union member pydantic tried (by tag or class name)
            path.pop()
            models = member
        # else a mapping's key (e.g. a gate's stage name): its values are the models already in hand
    if loc:
        path.append(str(loc[-1]))
    return path, (sorted(_keys(models[0])) if len(models) == 1 else [])


def format_validation_error(err: ValidationError, schema: type[BaseModel], source: str) -> str:
    """One line per problem: ``file: key.path: what is wrong (allowed: ...)``."""
    lines = [f"{source}: invalid configuration ({err.error_count()} problem(s))"]
    for e in err.errors():
        loc = tuple(e["loc"])
        path, allowed = _walk(schema, loc)
        key = ".".join(path) or "<top level>"
        if e["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key '{loc[-1]}'"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
            msg += f"; allowed keys here: {', '.join(allowed)}"
        else:
            msg = e["msg"]
            if "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], Mapping):
                msg += f" (got {e['input']!r})"
        lines.append(f"  {source}: {key}: {msg}")
    return "\n".join(lines)


def validate_config(schema: type[S], data: Mapping[str, Any], source: str = "<config>") -> S:
    """Validate a mapping against ``schema``; raise :class:`ConfigError` with a readable message."""
    try:
        return schema.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, schema, source)) from None


def load_config(
    schema: type[S],
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    **flat: Any,
) -> S:
    """Load ``path`` (optional), apply overrides, validate against ``schema``."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, overrides, **flat)
    source = str(path) if path is not None else "<defaults>"
    if overrides or any(v is not None for v in flat.values()):
        source += " (with command-line overrides)"
    return validate_config(schema, data, source)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config (paths as strings)."""
    return cfg.model_dump(mode="json")


def save_config(cfg: BaseModel, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML (what actually ran, every default filled in)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    return p
