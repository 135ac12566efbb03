"""Model architecture (llama.py), size presets, accounting and generation."""

from llm_pipeline.model.llama import KVCache, LlamaForCausalLM, build_model
from llm_pipeline.model.presets import PRESETS, get_preset

__all__ = ["PRESETS", "KVCache", "LlamaForCausalLM", "build_model", "get_preset"]
