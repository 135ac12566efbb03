"""The model section of a training config is checked when the file loads, not mid-run."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_pipeline.config import ConfigError, load_config
from llm_pipeline.train.config import PretrainConfig

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo" / "pretrain.yaml"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.overrides.hiden_size=64", "did you mean 'hidden_size'"),
        ("model.preset=tinyy", "did you mean 'tiny'"),
        ("model.overrides.num_attention_heads=7", "divisible by num_attention_heads"),
        ("model.init_from=/some/dir", None),
    ],
)
def test_model_section_errors_name_file_and_key(override, needle):
    if needle is None:  # init_from alone is fine; with overrides it is ambiguous
        load_config(PretrainConfig, DEMO, [override])
        with pytest.raises(ConfigError, match="cannot be combined with init_from"):
            load_config(PretrainConfig, DEMO, [override, "model.overrides.hidden_size=64"])
        return
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, DEMO, [override])
    assert needle in str(e.value) and "pretrain.yaml" in str(e.value) and "model" in str(e.value)
