"""Our LLaMA against transformers.LlamaForCausalLM: logits, export/import, greedy generation."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llm_pipeline.checkpoint.hf import load_pretrained, save_pretrained  # noqa: E402
from llm_pipeline.config import ModelConfig  # noqa: E402
from llm_pipeline.model import build_model, get_preset  # noqa: E402
from llm_pipeline.model.generate import generate  # noqa: E402

# GQA ratios 1, 2, 4; tied and untied; rope theta 1e4 and 5e5.
CASES = [
    dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0),
    dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0),
    dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0, head_dim=16),
]


def _cfg(**kw: object) -> ModelConfig:
    return get_preset("debug", **kw)


def _inputs(cfg: ModelConfig, b: int = 2, t: int = 37) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c['num_attention_heads']}kv{c['num_key_value_heads']}")
def test_export_loads_in_transformers_with_same_logits(tmp_path, case):
    cfg = _cfg(**case)
    ours = build_model(cfg, seed=3).eval()
    out = save_pretrained(ours, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    x = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)
    assert hf.config.tie_word_embeddings == cfg.tie_word_embeddings


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c['num_attention_heads']}kv{c['num_key_value_heads']}")
def test_import_of_transformers_model_gives_same_logits(tmp_path, case):
    cfg = _cfg(**case)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.resolved_head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=1e-6,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    torch.manual_seed(5)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf").eval()
    assert ours.config.rms_norm_eps == 1e-6
    x = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers_generate(tmp_path):
    cfg = _cfg(num_attention_heads=4, num_key_value_heads=2)
    ours = build_model(cfg, seed=11).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(save_pretrained(ours, tmp_path / "hf")).eval()
    prompt = [5, 17, 99, 3, 250, 8]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)[
        0, len(prompt) :
    ].tolist()
    assert generate(ours, [prompt], max_new_tokens=20) == [ref]


def test_batched_left_padded_generation_equals_one_by_one():
    cfg = _cfg()
    model = build_model(cfg, seed=2).eval()
    prompts = [[7, 8, 9, 10, 11, 12, 13], [42], [300, 301, 302]]
    batched = generate(model, prompts, max_new_tokens=12)
    single = [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single


def test_sharded_export_has_index_and_loads(tmp_path):
    cfg = _cfg()
    ours = build_model(cfg, seed=1).eval()
    out = save_pretrained(ours, tmp_path / "hf", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = _inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(out)(x), hf(x).logits, atol=1e-5, rtol=0)
