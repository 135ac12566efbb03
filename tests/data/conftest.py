"""Fixtures of the data tests: a tiny tokenizer folder with our chat template, trained in-process."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer

from .corpus import random_doc

ENGLISH = [
    "What does the function return? It returns the number of items in a container.",
    "Write a Python function with this signature and docstring.",
    "def f(x):\n    return x + 1\n",
    "Ünïcödé, emoji 🚀 and tabs\tare fine.",
]


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE (vocab 500) saved with our chat template, as the data stage saves it."""
    rng = random.Random(0)
    texts = [random_doc(rng, 120) for _ in range(40)] + ENGLISH * 10
    d = tmp_path_factory.mktemp("chat_tok")
    save_tokenizer(train_tokenizer(texts, vocab_size=500), d)
    return d


@pytest.fixture(scope="session")
def stdlib_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BPE (vocab 2048) trained on the embedded SFT/DPO functions: realistic token counts, fast tests."""
    from llm_pipeline.data.config import HELD_OUT_MODULES
    from llm_pipeline.data.stdlib_chat import stdlib_functions

    d = tmp_path_factory.mktemp("stdlib_tok")
    sources = [f.source for f in stdlib_functions(HELD_OUT_MODULES)]
    save_tokenizer(train_tokenizer(sources, vocab_size=2048), d)
    return d
