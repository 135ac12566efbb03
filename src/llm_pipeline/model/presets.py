"""Named model sizes, from a test-sized ``debug`` model to the 7B production target."""

from __future__ import annotations

from llm_pipeline.config import ModelConfig

PRESETS: dict[str, dict[str, object]] = {
    # 32 layers, hidden 4096, GQA 32/8, SwiGLU 14336, context 4096: 7,391,678,464 parameters.
    "7b": dict(
        vocab_size=50304,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rope_theta=500000.0,
    ),
    # TinyLlama-like shape with 8 KV heads: ~1.2B parameters.
    "1b": dict(
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rope_theta=500000.0,
    ),
    # Trains on 2 CPU cores in minutes (vocabulary set by the demo tokenizer).
    "tiny": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rope_theta=10000.0,
    ),
    # For unit tests: seconds per run.
    "debug": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
    ),
}


def get_preset(name: str, **overrides: object) -> ModelConfig:
    """The preset's config, with optional field overrides (validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig.model_validate({**PRESETS[name], **overrides})
