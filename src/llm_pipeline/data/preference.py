"""DPO data: preference pairs -> token ids of (prompt + chosen) and (prompt + rejected) -> batches.

Layouts (detected per record):

* ``prompt`` / ``chosen`` / ``rejected`` strings (the prompt is one user turn);
* ``prompt`` (a string or messages) with ``chosen`` / ``rejected`` as one-reply message lists (TRL's
  conversational form);
* ``chosen`` / ``rejected`` as whole conversations sharing their prompt turns, the last assistant turn
  being the completion (``HuggingFaceH4/ultrafeedback_binarized``); differing prompt turns are rejected.

Both sides are rendered with the same chat template as SFT; the completion is what follows the prompt's
generation prompt, and its trained tokens are the assistant reply and its end-of-turn token. Over-long
pairs lose the prompt's left side first (down to ``max_prompt_len``; a leading BOS is kept), then the
completions' tails (to ``max_seq_len``). Identical pairs (also after truncation), empty completions and
malformed records are counted and written to the rejects file.

Batches (int64, rows on dim 0): ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
``rejected_labels`` [B,T] (T = the longest of both sides in the micro-batch; labels shifted as in SFT:
position t holds token t+1 when it is a completion token, else -100) and ``pair_ids`` [B] (the pair's
index in its split, stable for the reference log-prob cache; -1 on filler rows), plus any per-pair
columns attached with :meth:`PreferenceBatchSource.attach` (DPO's reference log-probs, [B]).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llm_pipeline.data.chat import (
    ChatTemplate,
    Message,
    RecordError,
    as_messages,
    check_turn_order,
    normalize_messages,
)
from llm_pipeline.data.chat_sources import build_chat_sources, pad_id_of
from llm_pipeline.data.config import PreferenceDataConfig
from llm_pipeline.data.loader import IGNORE_INDEX
from llm_pipeline.data.rows import Batch, RowBatchSource
from llm_pipeline.data.sft import TokenExamples
from llm_pipeline.data.tokenizer import BOS_TOKEN
from llm_pipeline.hashing import bytes_digest

log = logging.getLogger(__name__)


def _messages(value: Any, what: str, *, reply: bool) -> list[Message]:
    try:
        return normalize_messages(value, what=what, require_reply=reply)
    except RecordError as e:
        if e.reason in ("empty_reply", "no_assistant_turn") and what != "prompt":
            raise RecordError("empty_completion", e.detail) from None
        raise


def parse_preference(record: Any, columns: dict[str, str] | None = None) -> tuple[list[Message], Message, Message]:
    """One preference record -> (prompt messages, chosen reply, rejected reply); raises RecordError."""
    cols = columns or {}
    if not isinstance(record, dict):
        raise RecordError("malformed_record", f"expected an object, got {type(record).__name__}")
    get = {name: record.get(cols.get(name, name)) for name in ("prompt", "chosen", "rejected", "system")}
    for name in ("chosen", "rejected"):
        if get[name] is None:
            raise RecordError("missing_field", f"no field {cols.get(name, name)!r}")
    chosen = _messages(as_messages(get["chosen"], "assistant"), "chosen", reply=True)
    rejected = _messages(as_messages(get["rejected"], "assistant"), "rejected", reply=True)
    if len(chosen) > 1 or len(rejected) > 1:  # whole conversations: the prompt turns must agree
        if chosen[:-1] != rejected[:-1]:
            raise RecordError("prompt_mismatch", "chosen and rejected conversations differ before their last reply")
        prompt = chosen[:-1]
    else:
        if get["prompt"] is None:
            raise RecordError("missing_field", f"no field {cols.get('prompt', 'prompt')!r}")
        prompt = _messages(as_messages(get["prompt"], "user"), "prompt", reply=False)
    if get["system"] and not (prompt and prompt[0]["role"] == "system"):
        prompt = _messages([{"role": "system", "content": get["system"]}, *prompt], "prompt", reply=False)
    if not any(m["role"] == "user" for m in prompt):
        raise RecordError("empty_message", "the prompt has no user turn")
    check_turn_order([*prompt, chosen[-1]], "prompt + chosen")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise RecordError("identical_pair", "chosen and rejected completions are the same text")
    return prompt, chosen[-1], rejected[-1]


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: tuple[list[int], list[int]]  # completion ids, trained mask
    rejected: tuple[list[int], list[int]]
    prompt_truncated: bool = False
    completion_truncated: bool = False


def _completion(
    prompt_ids: list[int], encoded: tuple[list[int], list[int]] | RecordError
) -> tuple[list[int], list[int]]:
    """The tokens after the prompt (and their trained mask) of prompt + reply."""
    if isinstance(encoded, RecordError):
        raise encoded
    ids, mask = encoded
    if ids[: len(prompt_ids)] != prompt_ids:
        raise RecordError("template_prefix_mismatch", "the prompt is not a token prefix of prompt + reply")
    return ids[len(prompt_ids) :], mask[len(prompt_ids) :]


def encode_pairs(
    template: ChatTemplate, parsed: list[tuple[list[Message], Message, Message]]
) -> list[EncodedPair | RecordError]:
    """Token ids of each prompt (with the generation prompt) and of each completion after it."""
    prompts = template.encode_many([p for p, _, _ in parsed], add_generation_prompt=True)
    chosen = template.encode_many([[*p, c] for p, c, _ in parsed])
    rejected = template.encode_many([[*p, r] for p, _, r in parsed])
    out: list[EncodedPair | RecordError] = []
    for prompt, *sides in zip(prompts, chosen, rejected, strict=True):
        try:
            if isinstance(prompt, RecordError):
                raise prompt
            out.append(EncodedPair(prompt[0], _completion(prompt[0], sides[0]), _completion(prompt[0], sides[1])))
        except RecordError as e:
            out.append(e)
    return out


def fit_pair(pair: EncodedPair, *, max_prompt_len: int, max_seq_len: int, bos_id: int | None) -> EncodedPair:
    """Truncate an over-long pair: the prompt's left side first (to ``max_prompt_len``), then the tails."""
    prompt = pair.prompt
    longest = len(prompt) + max(len(pair.chosen[0]), len(pair.rejected[0]))
    if longest > max_seq_len and len(prompt) > max_prompt_len:
        head = prompt[:1] if bos_id is not None and prompt[0] == bos_id else []
        prompt = head + prompt[len(prompt) - (max_prompt_len - len(head)) :]
        pair.prompt_truncated = True
    room = max_seq_len - len(prompt)
    sides = []
    for name, (ids, mask) in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if len(ids) > room:
            ids, mask = ids[:room], mask[:room]
            pair.completion_truncated = True
        if not any(mask):
            raise RecordError("no_trained_tokens", f"the {name} completion has no assistant token left")
        sides.append((ids, mask))
    if sides[0][0] == sides[1][0]:
        raise RecordError("identical_pair", f"chosen and rejected are the same after truncation to {max_seq_len}")
    pair.prompt, pair.chosen, pair.rejected = prompt, sides[0], sides[1]
    return pair


@dataclass
class PreferencePairs:
    """Both sides of every pair as full sequences (prompt + completion; trained = completion tokens)."""

    chosen: TokenExamples
    rejected: TokenExamples

    def __len__(self) -> int:
        return len(self.chosen)

    @classmethod
    def from_pairs(cls, pairs: list[EncodedPair]) -> PreferencePairs:
        sides = []
        for side in ("chosen", "rejected"):
            rows = [(p.prompt + getattr(p, side)[0], [0] * len(p.prompt) + getattr(p, side)[1]) for p in pairs]
            sides.append(TokenExamples.from_lists(rows))
        counts = {
            "prompt_truncated": sum(p.prompt_truncated for p in pairs),
            "completion_truncated": sum(p.completion_truncated for p in pairs),
        }
        sides[0].counts = counts
        return cls(*sides)


class PreferenceBatchSource(RowBatchSource):
    """Preference pairs, one per row, with the row-source contract of :mod:`.rows` (no packing)."""

    kind = "preference"

    def __init__(
        self,
        pairs: PreferencePairs,
        *,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        repeat: bool = True,
        pad_id: int = 0,
    ) -> None:
        if len(pairs) == 0:
            raise ValueError("PreferenceBatchSource needs at least one pair")
        self.pairs, self.pad_id = pairs, pad_id
        self.columns: dict[str, torch.Tensor] = {}
        super().__init__(micro_batch_size=micro_batch_size, seed=seed, rank=rank, world_size=world_size, repeat=repeat)

    @property
    def rows_per_epoch(self) -> int:
        return len(self.pairs)

    def _build_epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(len(self.pairs))

    def attach(self, **columns: torch.Tensor) -> None:
        """Per-pair values (one per pair, by pair id) added to every batch as [B] rows (0 on filler rows).

        DPO attaches the reference model's log-probs this way, so they follow the rows through
        micro-batching and the OOM split like every other tensor of the batch.
        """
        for name, values in columns.items():
            if values.shape != (len(self.pairs),):
                raise ValueError(f"column {name!r} has shape {tuple(values.shape)}, expected ({len(self.pairs)},)")
        self.columns.update(columns)

    def collate_pairs(self, pair_ids: list[int]) -> Batch:
        """A batch of the given pairs (by id; -1 = a filler row), outside the training order."""
        return self._collate([None if i < 0 else (pair_ids, k) for k, i in enumerate(pair_ids)])

    def _collate(self, picked: list[tuple[Any, int] | None]) -> Batch:
        ids = [-1 if p is None else int(p[0][p[1]]) for p in picked]  # (epoch order, row) -> pair index
        sides = {"chosen": self.pairs.chosen, "rejected": self.pairs.rejected}
        t = max([1, *(int(ex.lengths[i]) for ex in sides.values() for i in ids if i >= 0)])
        out: Batch = {}
        for name, ex in sides.items():
            inputs = np.full((len(ids), t), self.pad_id, np.int64)
            labels = np.full((len(ids), t), IGNORE_INDEX, np.int64)
            for r, i in enumerate(ids):
                if i < 0:
                    continue
                tokens, trained = ex.example(i)
                n = len(tokens)
                inputs[r, :n] = tokens
                labels[r, : n - 1] = np.where(trained[1:], tokens[1:], IGNORE_INDEX)
            out[f"{name}_input_ids"] = torch.from_numpy(inputs)
            out[f"{name}_labels"] = torch.from_numpy(labels)
        out["pair_ids"] = pair_ids = torch.tensor(ids, dtype=torch.int64)
        real = pair_ids >= 0
        for name, values in self.columns.items():
            out[name] = torch.where(real, values[pair_ids.clamp_min(0)], torch.zeros((), dtype=values.dtype))
        return out

    def fingerprint(self) -> str:
        return bytes_digest(self.pairs.chosen.fingerprint(), self.pairs.rejected.fingerprint())

    def _state_extra(self) -> dict[str, Any]:
        return {"num_pairs": len(self.pairs)}

    def stats(self) -> dict[str, float]:
        c, r = self.pairs.chosen, self.pairs.rejected
        return {
            "pairs": len(self.pairs),
            "tokens": int(c.lengths.sum() + r.lengths.sum()),
            "chosen_trained_tokens": c.num_trained,
            "rejected_trained_tokens": r.num_trained,
            **{k: float(v) for k, v in c.counts.items()},
        }


def build_preference_sources(
    cfg: PreferenceDataConfig,
    tokenizer_dir: str | os.PathLike[str],
    *,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    output_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
) -> tuple[PreferenceBatchSource, PreferenceBatchSource | None, dict[str, Any]]:
    """Read, tokenise and truncate the preference pairs: ``(train source, val source or None, report)``."""
    template = ChatTemplate.from_dir(tokenizer_dir)
    bos_id = template.tokenizer.token_to_id(template.variables.get("bos_token", BOS_TOKEN))

    def make_source(split: str, pairs: list[EncodedPair]) -> PreferenceBatchSource:
        return PreferenceBatchSource(
            PreferencePairs.from_pairs(pairs),
            micro_batch_size=micro_batch_size,
            seed=cfg.seed if cfg.seed is not None else seed,
            rank=rank,
            world_size=world_size,
            repeat=split == "train",
            pad_id=pad_id_of(template),
        )

    sources, report = build_chat_sources(
        cfg,
        template,
        "preference",
        parse=lambda record: parse_preference(record, cfg.columns),
        encode=lambda parsed: encode_pairs(template, parsed),
        fit=lambda pair: fit_pair(pair, max_prompt_len=cfg.max_prompt_len, max_seq_len=cfg.max_seq_len, bos_id=bos_id),
        make_source=make_source,
        rank=rank,
        output_dir=output_dir,
        show_progress=show_progress,
    )
    return sources["train"], sources.get("val"), report
