"""Chat data, a tokenizer and a tiny model folder for the SFT tests (offline, deterministic, seconds).

The conversations are learnable rules (reverse a word list, repeat it, count on from a number), so a
few dozen steps of a `debug`-size model visibly lower the held-out loss. Used by ``test_sft.py`` and
by the 2-rank FSDP worker.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from llm_pipeline.checkpoint.hf import save_pretrained
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.train.sft import SFTConfig

WORDS = [f"{a}{b}" for a in "bdgklmnprstvz" for b in ("a", "e", "i", "o", "u", "an", "or", "ix")]
SYSTEM = "You follow the instruction exactly."


def _turn(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
    kind = rng.randrange(3)
    if kind == 0:
        return "reverse: " + " ".join(words), " ".join(reversed(words))
    if kind == 1:
        return "repeat twice: " + " ".join(words), " ".join(words + words)
    start = rng.randint(0, 80)
    return f"count on from {start}", " ".join(str(start + i) for i in range(1, rng.randint(3, 12)))


def chat_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``messages`` records: one or two turns, a system prompt on every third."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []
        for _ in range(1 + (i % 4 == 0)):
            q, a = _turn(rng)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": msgs})
    return out


def write_records(path: Path, records: list[dict[str, Any]], bad_lines: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(bad_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_chat_tokenizer(out: Path, *, vocab_size: int = 400) -> Path:
    """Our byte-level BPE (specials and chat template included) trained on the chat texts."""
    from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer

    texts = [m["content"] for r in chat_records(400, seed=99) for m in r["messages"]]
    save_tokenizer(train_tokenizer(texts, vocab_size=vocab_size), out)
    return out


def make_chat_model(out: Path, tokenizer_dir: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A randomly initialised `debug` model (vocab 512) saved as an HF folder with the tokenizer."""
    model = build_model(get_preset("debug", **overrides), seed=seed)
    return save_pretrained(model, out, tokenizer_dir=tokenizer_dir)


def sft_config(tmp: Path, model_dir: Path, train: Path, val: Path | None = None, **training: Any) -> SFTConfig:
    """fp32, rows of 96 tokens, 4 rows per step in micro-batches of 2: milliseconds a step on CPU."""
    data = {"kind": "local", "paths": [str(train)], "max_seq_len": 96, **training.pop("data", {})}
    if val is not None:
        data["val_paths"] = [str(val)]
    train_cfg = {
        "max_steps": 6, "global_batch_size": 4, "micro_batch_size": 2, "learning_rate": 3e-3, "warmup_steps": 1,
        "precision": "fp32", "logging_steps": 1, "eval_steps": 0, "eval_batches": 50, "save_steps": 0,
        "output_dir": str(tmp / "ckpt"), "logging_dir": str(tmp / "logs"),
    }  # fmt: skip
    train_cfg.update(training)
    return SFTConfig.model_validate(
        {
            "model": {"preset": None, "init_from": str(model_dir)},
            "data": data,
            "training": train_cfg,
            "parallel": {"device": "cpu", "fp8": False},
        }
    )
