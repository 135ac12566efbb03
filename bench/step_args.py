"""Command-line options shared by the step benchmarks (model_step.py, train_step.py)."""

from __future__ import annotations

import argparse


def step_bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """Model size, batch shape, timing rounds and modes: the same knobs for every step benchmark."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument("--modes", default="eager-fp32,eager-bf16,compiled-bf16")
    return ap
