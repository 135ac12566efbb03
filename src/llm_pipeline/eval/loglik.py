"""Batched log-likelihood of continuations given contexts, with the EleutherAI harness' conventions.

Tokenisation follows ``lm-eval``'s ``HFLM``: trailing whitespace of the context moves to the
continuation, the pair is encoded whole and the continuation is what follows the context's own
encoding; over-long inputs are cut from the left to the model context. Requests that feed the model
the same tokens (the four one-token answers " A".." D" of an MMLU question) share one forward pass,
and only the continuation positions go through the LM head, so 5-shot MMLU stays cheap in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llm_pipeline.eval.budget import Budget


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's own post-processing (as ``lm-eval`` does by default)."""
    return list(tokenizer.encode(text).ids)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split the way ``lm-eval`` splits them."""
    if not context:
        raise ValueError("context must not be empty")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def loglikelihood(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    budget: Budget | None = None,
) -> list[tuple[float, bool]]:
    """For each (context, continuation): (sum of log p(continuation | context), is it the greedy choice).

    ``model`` is an ``llm_pipeline`` LLaMA (``model.model`` -> hidden states, ``model.lm_head``).
    ``budget.advance`` counts requests; ``budget.check`` runs between batches.
    """
    max_length = max_length or model.config.max_position_embeddings
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for idx, (ctx, cont) in enumerate(requests):
        cont = list(cont)
        if not cont:
            raise ValueError(f"request {idx}: empty continuation")
        if len(cont) > max_length:
            raise ValueError(f"request {idx}: continuation of {len(cont)} tokens exceeds max_length {max_length}")
        inp = (list(ctx) + cont)[-(max_length + 1) :][:-1]
        if not inp:
            raise ValueError(f"request {idx}: empty context (give the tokenizer a BOS/EOS prefix)")
        groups.setdefault(tuple(inp), []).append((idx, cont))
    # Longest first: the first batch shows the worst-case memory at once (as lm-eval does).
    order = sorted(groups, key=lambda k: -len(k))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    try:
        for start in range(0, len(order), batch_size):
            if budget is not None:
                budget.check()
            batch = order[start : start + batch_size]
            width = len(batch[0])
            ids = torch.zeros((len(batch), width), dtype=torch.long, device=param.device)
            for row, inp in enumerate(batch):
                ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            # Right padding: pads come after every real token, so causal attention never sees them.
            hidden = model.model(ids)  # [B, T, H]
            picked, spans = [], []
            for row, inp in enumerate(batch):
                need = max(len(c) for _, c in groups[inp])
                picked.append(hidden[row, len(inp) - need : len(inp)])  # [need, H]
                spans.append(need)
            logprobs = torch.log_softmax(model.lm_head(torch.cat(picked)).float(), dim=-1)  # [sum(need), V]
            offset = 0
            for inp, need in zip(batch, spans, strict=True):
                rows = logprobs[offset : offset + need]
                offset += need
                for idx, cont in groups[inp]:
                    lp = rows[need - len(cont) :]
                    target = torch.tensor(cont, device=lp.device)
                    total = lp.gather(-1, target[:, None]).sum().item()
                    greedy = bool((lp.argmax(-1) == target).all())
                    results[idx] = (total, greedy)
            if budget is not None:
                budget.advance(sum(len(groups[inp]) for inp in batch))
    finally:
        model.train(was_training)
    return results
