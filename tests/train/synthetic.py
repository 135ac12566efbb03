"""A tiny in-memory token stream implementing the trainer's BatchSource protocol (for tests).

Documents are arithmetic progressions mod the vocabulary (``a, a+d, a+2d, ...``), so a small model
learns them within a few dozen steps. Rows are cut from one global stream: each micro-step takes
``world_size x micro`` rows and rank ``r`` keeps its block of ``micro`` rows, so one process with a
micro-batch of 2 sees exactly the rows that two ranks with a micro-batch of 1 see together.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class SyntheticTokenSource:
    def __init__(
        self,
        *,
        vocab_size: int = 512,
        seq_len: int = 32,
        micro_batch_size: int = 2,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_tokens: int = 1 << 16,
    ) -> None:
        rng = np.random.default_rng(seed)
        tokens, docs = [], []
        doc = 0
        while sum(len(t) for t in tokens) < num_tokens + 1:
            n = int(rng.integers(16, 96))
            a, d = int(rng.integers(0, vocab_size)), int(rng.integers(1, 4))
            tokens.append((a + d * np.arange(n)) % vocab_size)
            docs.append(np.full(n, doc))
            doc += 1
        self.tokens = torch.from_numpy(np.concatenate(tokens)[: num_tokens + 1].astype(np.int64))
        self.docs = torch.from_numpy(np.concatenate(docs)[: num_tokens + 1].astype(np.int64))
        self.rank, self.world_size = rank, world_size
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.pos = 0
        self.batches_served = 0

    @property
    def tokens_per_batch(self) -> int:
        return self.seq_len * self.micro_batch_size

    def set_seq_len(self, seq_len: int, micro_batch_size: int) -> None:
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size

    def next_batch(self) -> dict[str, torch.Tensor]:
        t, b = self.seq_len, self.micro_batch_size
        span = self.world_size * b * t
        if self.pos + span + 1 > len(self.tokens):
            self.pos = 0  # wrap around
        start = self.pos + self.rank * b * t
        idx = start + torch.arange(b)[:, None] * t + torch.arange(t)[None, :]
        self.pos += span
        self.batches_served += 1
        return {"input_ids": self.tokens[idx], "labels": self.tokens[idx + 1], "document_ids": self.docs[idx]}

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "seq_len": self.seq_len, "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = state["pos"]
        self.seq_len, self.micro_batch_size = state["seq_len"], state["micro_batch_size"]
