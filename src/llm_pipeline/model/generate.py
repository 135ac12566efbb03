"""Batched text generation with a KV cache: greedy, temperature, top-k and top-p sampling.

Prompts of different lengths are left-padded into one batch, so every row's next token sits in
the same column; the padding mask keeps pads out of attention and positions (as HF does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from llm_pipeline.model.kernels import linear
from llm_pipeline.model.llama import KVCache, LlamaForCausalLM

DEFAULT_STOP_TOKENS = ("<|eos|>", "<|end|>", "</s>", "<|endoftext|>", "<|eot_id|>")
BOS_TOKENS = ("<|bos|>", "<s>", "<|begin_of_text|>")


def encode_prompt(tokenizer: object, text: str, *, add_bos: bool | None = None) -> list[int]:
    """Token ids of a prompt, starting with BOS the way training documents do.

    ``add_bos=None`` prepends the tokenizer's BOS token when it has one and its own post-processor
    did not already add it (our tokenizer adds none; HF Llama tokenizers add ``<s>`` themselves).
    """
    ids = list(tokenizer.encode(text).ids)  # type: ignore[attr-defined]
    if add_bos is False:
        return ids
    bos = next((i for i in (tokenizer.token_to_id(t) for t in BOS_TOKENS) if i is not None), None)  # type: ignore[attr-defined]
    if bos is None:
        if add_bos:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        return ids
    return ids if ids[:1] == [bos] else [bos, *ids]


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row from ``logits`` [B, V]: argmax when temperature is 0.

    ``uniforms`` [B] in [0, 1) (instead of ``generator``) picks by inverse CDF: a row's token then depends on
    its own number only, not on which other rows share the batch.
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    if uniforms is not None:
        cdf = probs.cumsum(-1)
        pick = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        return pick.clamp_max(logits.shape[-1] - 1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _last_logits(hidden: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    """Logits [B, V] of the last position only (the next token's), through the model's own head kernel."""
    return linear(head, hidden[:, -1])


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    seed: int | None = None,
    stop_fn: Callable[[int, list[int]], bool] | None = None,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    keep_stepping: Callable[[bool], bool] | None = None,
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens only (an EOS token is included, then stops).

    ``stop_fn(row, new_tokens)`` may end a row early (used for stop strings). ``generator`` (instead of
    ``seed``) draws the samples from a generator the caller keeps, e.g. to checkpoint its state;
    ``uniforms`` [B, max_new_tokens] instead gives each row its own numbers (see :func:`sample_next`).
    ``keep_stepping(still_running)`` decides whether the loop goes on: ranks whose forwards are collective
    (FSDP) pass :func:`~llm_pipeline.train.parallel.any_rank`, so all step until every rank is done.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, {top_k})")
    vocab = model.config.vocab_size
    bad = sorted({int(t) for p in prompts for t in p if not 0 <= int(t) < vocab})
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary (0..{vocab - 1})")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    lengths = [len(p) for p in prompts]
    b, width = len(prompts), max(lengths)
    total = width + max_new_tokens
    limit = model.config.max_position_embeddings
    if total > limit:
        raise ValueError(f"prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds the model context ({limit})")
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((b, total), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) : width] = 1
    padded = min(lengths) != width
    prompt_len = torch.as_tensor(lengths, dtype=torch.long, device=device)
    cache = KVCache(model.config, b, total, device, dtype)
    gen = generator
    if gen is None and seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=device)
    try:
        # The prompt's logits are needed at its last position only: the LM head runs on that one.
        logits = model(input_ids, attention_mask=mask[:, :width] if padded else None, cache=cache, head_fn=_last_logits)
        for step in range(max_new_tokens):
            u = uniforms[:, step] if uniforms is not None else None
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen, uniforms=u)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            # One host sync for the step's tokens and flags, not one per row.
            for i, (tok, was_done) in enumerate(zip(nxt.tolist(), done.tolist(), strict=True)):
                if not was_done:
                    out[i].append(tok)
                    if stop_fn is not None and stop_fn(i, out[i]):
                        done[i] = True
            if eos.numel():
                done |= torch.isin(nxt, eos)
            finished = bool(done.all())
            if keep_stepping is not None:
                finished = not keep_stepping(not finished)
            if finished or step == max_new_tokens - 1:
                break
            mask[:, width + step] = 1
            step_mask = mask[:, : width + step + 1] if padded else None
            # A row's new token sits at its prompt length + step (what the model derives from the mask).
            pos = (prompt_len + step)[:, None] if padded else None
            logits = model(nxt[:, None], position_ids=pos, attention_mask=step_mask, cache=cache, head_fn=_last_logits)
    finally:
        model.train(was_training)
    return out


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate_text(
    model: LlamaForCausalLM,
    tokenizer: object,
    prompts: Sequence[str],
    *,
    stop_strings: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    add_bos: bool | None = None,
    **kwargs: object,
) -> list[str]:
    """Text in, text out with a ``tokenizers.Tokenizer``; completions are cut at the first stop string.

    EOS defaults to whichever of the common end tokens the tokenizer knows; prompts start with BOS
    (see :func:`encode_prompt`).
    """
    tok = tokenizer
    encoded = [encode_prompt(tok, p, add_bos=add_bos) for p in prompts]
    if eos_token_ids is None:
        ids = (tok.token_to_id(t) for t in DEFAULT_STOP_TOKENS)  # type: ignore[attr-defined]
        eos_token_ids = [i for i in ids if i is not None]
    pad = tok.token_to_id("<|pad|>")  # type: ignore[attr-defined]

    def stop_fn(_row: int, new: list[int]) -> bool:
        return bool(stop_strings) and _cut_at_stop(tok.decode(new), stop_strings)[1]  # type: ignore[attr-defined]

    outputs = generate(
        model,
        encoded,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad if pad is not None else 0,
        stop_fn=stop_fn if stop_strings else None,
        **kwargs,  # type: ignore[arg-type]
    )
    eos_set = set(eos_token_ids)
    texts = []
    for new in outputs:
        if new and new[-1] in eos_set:
            new = new[:-1]
        texts.append(_cut_at_stop(tok.decode(new), stop_strings)[0])  # type: ignore[attr-defined]
    return texts
