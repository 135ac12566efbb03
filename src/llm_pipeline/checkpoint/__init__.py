"""Checkpoints: HF-format model directories (hf.py) and training state."""
