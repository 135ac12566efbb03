"""Completions by a model folder: of token ids, of text prompts, or of chat messages through its template.

What ``llm-pipeline generate`` prints, one JSON-ready record per prompt; the sampling itself is
:mod:`llm_pipeline.model.generate` (KV cache, greedy / temperature / top-k / top-p).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

PathLike = str | os.PathLike[str]


def complete(
    model_dir: PathLike,
    *,
    prompts: Sequence[str] = (),
    ids: Sequence[Sequence[int]] = (),
    chat: Sequence[str] = (),
    system: str | None = None,
    tokenizer: PathLike | None = None,
    stop: Sequence[str] = (),
    dtype: str = "auto",
    **sampling: Any,
) -> list[dict[str, Any]]:
    """Load ``model_dir`` (checked against its checksums) and complete one kind of input.

    ``ids``: ``{"prompt_ids", "new_ids"}`` (no tokenizer needed); ``chat``: each message a user turn after
    ``system``, answered until the template's end of turn (``{"chat", "completion"}``); else ``prompts`` as
    text, cut at ``stop`` strings (``{"prompt", "completion"}``). The tokenizer is the model's unless given.
    ``sampling``: ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``.
    """
    from llm_pipeline.checkpoint.hf import load_pretrained
    from llm_pipeline.model.generate import generate, generate_text

    if system and not chat:
        raise ValueError("a system prompt goes with chat messages (--system with --chat)")
    model = load_pretrained(model_dir, dtype=dtype)
    if ids:
        out = generate(model, [list(p) for p in ids], **sampling)
        return [{"prompt_ids": list(p), "new_ids": new} for p, new in zip(ids, out, strict=True)]
    if chat:
        return _chat(model, tokenizer or model_dir, chat, system, sampling)
    from llm_pipeline.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(tokenizer or model_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; pass --tokenizer DIR, or token ids with --ids") from None
    texts = generate_text(model, tok, list(prompts), stop_strings=stop, **sampling)
    return [{"prompt": p, "completion": text} for p, text in zip(prompts, texts, strict=True)]


def _chat(
    model: Any, tokenizer_dir: PathLike, messages: Sequence[str], system: str | None, sampling: dict[str, Any]
) -> list[dict[str, Any]]:
    """Each message as a user turn through the chat template, answered from the generation prompt until the
    template's end-of-turn token (which is not part of the answer)."""
    from llm_pipeline.data.chat import ChatTemplate
    from llm_pipeline.data.sft import pad_id_of
    from llm_pipeline.model.generate import generate

    template = ChatTemplate.from_dir(tokenizer_dir)
    before = [{"role": "system", "content": system}] if system else []
    prompts = [template.encode_prompt([*before, {"role": "user", "content": q}]) for q in messages]
    stops = template.stop_token_ids()
    outputs = generate(model, prompts, eos_token_ids=stops, pad_token_id=pad_id_of(template), **sampling)
    records = []
    for question, new in zip(messages, outputs, strict=True):
        if new and new[-1] in stops:
            new = new[:-1]
        records.append({"chat": question, "completion": template.tokenizer.decode(new)})
    return records
