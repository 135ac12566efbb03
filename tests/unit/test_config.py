"""Strict configs: every mistake names the key and the file, and says what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_pipeline.config import ConfigError, ModelConfig, load_config, save_config
from llm_pipeline.model.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "model.yaml"
    p.write_text(text)
    return p


def _error(schema, path, *overrides):
    with pytest.raises(ConfigError) as e:
        load_config(schema, path, overrides)
    return str(e.value)


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    p = _write(tmp_path, "hidden_size: 64\nnum_hiden_layers: 2\n")
    msg = _error(ModelConfig, p)
    assert str(p) in msg and "num_hiden_layers" in msg
    assert "did you mean 'num_hidden_layers'" in msg and "allowed keys" in msg


def test_unknown_key_inside_a_section_of_several_kinds_names_its_path_and_the_allowed_keys(tmp_path):
    """LoRA's data.domain is token shards or chat data (``kind``): a typo names data.domain.<key> and what
    that kind allows, as everywhere else (not data.domain.tokens.<key> with an empty list)."""
    from llm_pipeline.train.lora_stage import LoRAStageConfig

    p = tmp_path / "lora.yaml"
    p.write_text("model: {init_from: base}\ndata: {packed_dir: packed, domain: {kind: tokens, pathh: x}}\n")
    msg = _error(LoRAStageConfig, p)
    assert "data.domain.pathh: unknown key 'pathh' (did you mean 'path'?)" in msg, msg
    assert "allowed keys here: kind, path, train_split, val_split" in msg, msg


def test_wrong_type_names_key_and_value(tmp_path):
    msg = _error(ModelConfig, _write(tmp_path, "hidden_size: lots\n"))
    assert "hidden_size" in msg and "'lots'" in msg and "model.yaml" in msg


@pytest.mark.parametrize(
    "text, needle",
    [
        ("hidden_size: 100\nnum_attention_heads: 3\n", "divisible by num_attention_heads"),
        ("num_attention_heads: 32\nnum_key_value_heads: 5\n", "divisible by num_key_value_heads"),
        ("num_hidden_layers: -2\n", "num_hidden_layers"),
        ("rope_theta: 0\n", "rope_theta"),
    ],
)
def test_impossible_values(tmp_path, text, needle):
    msg = _error(ModelConfig, _write(tmp_path, text))
    assert needle in msg and "model.yaml" in msg


def test_overrides_go_through_the_same_validation(tmp_path):
    p = _write(tmp_path, "hidden_size: 64\nnum_attention_heads: 4\nnum_key_value_heads: 2\n")
    cfg = load_config(ModelConfig, p, ["num_hidden_layers=3", "tie_word_embeddings=true"])
    assert cfg.num_hidden_layers == 3 and cfg.tie_word_embeddings is True
    msg = _error(ModelConfig, p, "num_hidden_layer=3")
    assert "num_hidden_layer" in msg and "command-line overrides" in msg
    assert "num_hidden_layers" in msg
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(ModelConfig, p, ["oops"])


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(ModelConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(ModelConfig, _write(tmp_path, "hidden_size: [1,\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(ModelConfig, _write(tmp_path, "- 1\n- 2\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = get_preset("tiny")
    path = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(ModelConfig, path) == cfg


def test_shipped_model_config_equals_preset():
    assert load_config(ModelConfig, ROOT / "configs" / "model_7b.yaml") == get_preset("7b")
