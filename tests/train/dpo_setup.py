"""What the DPO tests start from: a tiny start model with its own tokenizer and chat template, and pairs.

The pairs carry a learnable preference: chosen replies start with "yes", rejected ones with "no",
after prompts of random words; validation pairs use other words. Shared by test_dpo.py and the
2-rank FSDP2 worker.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from llm_pipeline.train.dpo import DPOConfig

WORDS = [f"{a}{b}{c}" for a in "bdfgklmnprstvz" for b in "aeiou" for c in ("", "n", "r", "s")]


def _pair(rng: random.Random) -> dict[str, str]:
    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    tail = words(rng.randint(1, 6))
    return {
        "prompt": f"is {words(rng.randint(2, 8))} fine?",
        "chosen": f"yes {tail}",
        "rejected": f"no {tail} {words(rng.randint(0, 3))}".strip(),
    }


def write_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(_pair(rng)) + "\n" for _ in range(n)), encoding="utf-8")
    return path


def make_start(root: Path) -> dict[str, Path]:
    """A debug-preset model (vocab 512) saved as an HF folder with a 400-token BPE and our chat template,
    plus 48 training and 16 validation pairs."""
    from llm_pipeline.checkpoint.hf import save_pretrained
    from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer
    from llm_pipeline.model import build_model, get_preset

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) + " yes no is fine?" for _ in range(200)]
    tok_dir = save_tokenizer(train_tokenizer(texts, vocab_size=400), root / "tokenizer")
    model_dir = save_pretrained(build_model(get_preset("debug"), seed=0), root / "start", tokenizer_dir=tok_dir)
    return {
        "model": model_dir,
        "train": write_pairs(root / "pairs" / "train.jsonl", 48, seed=1),
        "val": write_pairs(root / "pairs" / "val.jsonl", 16, seed=2),
    }


def dpo_config(out: Path, start: dict[str, Path], *, dpo: dict[str, Any] | None = None, **training: Any) -> DPOConfig:
    """fp32, 4 pairs per step in micro-batches of 2, rows of at most 48 tokens: a step takes milliseconds."""
    train = {
        "max_steps": 6, "global_batch_size": 4, "micro_batch_size": 2, "learning_rate": 2e-3, "warmup_steps": 0,
        "lr_schedule": "constant", "precision": "fp32", "logging_steps": 1, "eval_steps": 0, "eval_batches": 20,
        "save_steps": 0, "output_dir": str(out / "ckpt"), "logging_dir": str(out / "logs"), "weight_decay": 0.0,
    }  # fmt: skip
    train.update(training)
    data = {
        "kind": "local", "paths": [str(start["train"])], "val_paths": [str(start["val"])], "max_seq_len": 48,
        "max_prompt_len": 24, "rejects_path": str(out / "rejects.jsonl"),
    }  # fmt: skip
    return DPOConfig.model_validate(
        {
            "model": {"init_from": str(start["model"])},
            "training": train,
            "parallel": {"device": "cpu", "fp8": False},
            "data": data,
            "dpo": dpo or {},
        }
    )
