"""Shared fixtures: a byte-level BPE tokenizer trained in-process and a debug-size HF model directory."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm_pipeline.checkpoint.hf import save_pretrained
from llm_pipeline.model import build_model, get_preset

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]
WORDS = [
    "the",
    "cell",
    "membrane",
    "protein",
    "energy",
    "river",
    "mountain",
    "history",
    "law",
    "market",
    "price",
    "city",
    "king",
    "war",
    "water",
    "light",
    "force",
    "mass",
    "atom",
    "number",
    "prime",
    "function",
    "value",
    "error",
    "system",
    "network",
    "memory",
    "court",
    "state",
]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "." for _ in range(n)]


def train_tokenizer(vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([*corpus(), "def f(x):\n    return x + 1\n", "A. B. C. D. Answer: Question:"], trainer)
    return tok


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tokenizer")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(), bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    hf.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """Our debug model (random init, fixed seed) exported as an HF LLaMA directory."""
    model = build_model(get_preset("debug"), seed=0)
    return save_pretrained(model, tmp_path_factory.mktemp("model") / "debug", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def words() -> list[str]:
    return list(WORDS)
