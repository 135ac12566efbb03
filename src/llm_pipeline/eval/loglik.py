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


@torch.no_grad()
def loglikelihood_shared(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    budget: Budget | None = None,
) -> list[tuple[float, bool]]:
    """:func:`loglikelihood` for multi-token continuations that share a context (ARC, HellaSwag, PIQA...).

    Each distinct context runs through the model once (``batch_size`` contexts per forward) and fills
    a KV cache; the continuations then run over that cache, one row each, so the context is never
    recomputed per choice. Same numbers as :func:`loglikelihood` (and lm-eval's ``HFLM``) to float
    rounding. Requests that would be cut to the model context go through :func:`loglikelihood`.
    """
    from llm_pipeline.model.llama import KVCache

    max_length = max_length or model.config.max_position_embeddings
    by_ctx: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    rest: list[int] = []
    for idx, (ctx, cont) in enumerate(requests):
        cont = list(cont)
        if ctx and cont and len(ctx) + len(cont) - 1 <= max_length:
            by_ctx.setdefault(tuple(ctx), []).append((idx, cont))
        else:
            rest.append(idx)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    if rest:
        for idx, res in zip(
            rest, loglikelihood(model, [requests[i] for i in rest], max_length=max_length, budget=budget), strict=True
        ):
            results[idx] = res
    order = sorted(by_ctx, key=lambda k: -(len(k) + max(len(c) for _, c in by_ctx[k])))
    param = next(model.parameters())
    dev = param.device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            if budget is not None:
                budget.check()
            batch = order[start : start + batch_size]
            width = max(len(c) for c in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long, device=dev)
            for row, ctx in enumerate(batch):
                ids[row, : len(ctx)] = torch.tensor(ctx, dtype=torch.long)
            cache = KVCache(model.config, len(batch), width, dev, param.dtype)
            hidden = model.model(ids, cache=cache)  # right-padded contexts: pads come after every real token
            first = model.lm_head(torch.stack([hidden[r, len(c) - 1] for r, c in enumerate(batch)])).float()
            first = torch.log_softmax(first, dim=-1)  # [contexts, V]: the first continuation token's scores
            rows = [(r, idx, cont) for r, ctx in enumerate(batch) for idx, cont in by_ctx[ctx]]
            tail = max(len(cont) for _, _, cont in rows) - 1
            rest_lp: torch.Tensor | None = None
            if tail > 0:
                owner = torch.tensor([r for r, _, _ in rows], device=dev)
                big = KVCache(model.config, len(rows), width + tail, dev, param.dtype)
                for layer in range(model.config.num_hidden_layers):
                    big.keys[layer][:, :, :width] = cache.keys[layer][owner]
                    big.values[layer][:, :, :width] = cache.values[layer][owner]
                big.length = width
                inp = torch.zeros((len(rows), tail), dtype=torch.long, device=dev)
                mask = torch.zeros((len(rows), width + tail), dtype=torch.long, device=dev)
                pos = torch.zeros((len(rows), tail), dtype=torch.long, device=dev)
                for i, (r, _, cont) in enumerate(rows):
                    n_ctx = len(batch[r])
                    inp[i, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
                    mask[i, :n_ctx] = 1
                    mask[i, width:] = 1  # pads after the continuation are never seen by a real token
                    pos[i] = torch.arange(n_ctx, n_ctx + tail, device=dev)
                out = model.model(inp, position_ids=pos, attention_mask=mask, cache=big)
                rest_lp = torch.log_softmax(model.lm_head(out).float(), dim=-1)  # [rows, tail, V]
            for i, (r, idx, cont) in enumerate(rows):
                lp = first[r : r + 1]
                if len(cont) > 1:
                    assert rest_lp is not None
                    lp = torch.cat([lp, rest_lp[i, : len(cont) - 1]])
                target = torch.tensor(cont, device=dev)
                total = lp.gather(-1, target[:, None]).sum().item()
                results[idx] = (total, bool((lp.argmax(-1) == target).all()))
            if budget is not None:
                budget.advance(len(rows))
    finally:
        model.train(was_training)
    return results
