"""llm_pipeline: raw text to an evaluated, HF-loadable LLaMA-style checkpoint."""

__version__ = "0.1.0"
