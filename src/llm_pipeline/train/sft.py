"""The SFT stage: chat data, a loss on assistant tokens only, packed rows that never mix examples.

A stage on the runner (:mod:`llm_pipeline.train.stage`): the data layer (:mod:`llm_pipeline.data.sft`)
turns conversations into token ids with a trained-token mask and packs them best-fit-decreasing into
rows of ``data.max_seq_len``; :class:`~llm_pipeline.train.objectives.CausalLMObjective` with
``trained_only`` trains on the assistant tokens, normalised by the trained tokens of the whole global
batch, with per-example attention and positions in packed rows. The export at ``<output_dir>_final``
carries the chat template, and its ``generation_config.json`` stops at the end-of-turn token.

The tokenizer is ``data.tokenizer_dir`` or the starting model's own. A folder with a chat template
keeps it (a model imported from the hub trains in its own format). A folder without one gets ours:
the tokenizer is copied to ``<output_dir>/chat_tokenizer`` with the chat tokens it lacks added as
special tokens, and the model's embedding and LM-head rows for them start at the mean of the rows
of the tokens it already knows (so a new token starts as an average token, not as noise).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from tokenizers import AddedToken, Tokenizer
from torch import nn

from llm_pipeline.config import ModelConfig
from llm_pipeline.data.chat import CHAT_TEMPLATE, read_chat_template, special_tokens_map, write_chat_template
from llm_pipeline.data.config import SFTDataConfig
from llm_pipeline.data.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    END_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    load_tokenizer,
)
from llm_pipeline.train.batching import BatchSource
from llm_pipeline.train.chat_stage import ChatStage
from llm_pipeline.train.config import StageConfig
from llm_pipeline.train.objectives import CausalLMObjective, Objective
from llm_pipeline.train.parallel import DistInfo, barrier

log = logging.getLogger(__name__)

#: Grown vocabularies are rounded up to a multiple of this (matmul-friendly shapes).
VOCAB_MULTIPLE = 64
CHAT_TOKENIZER_DIR = "chat_tokenizer"
DATA_REPORT = "sft_data.json"


class SFTConfig(StageConfig):
    """``configs/sft.yaml``: the starting model, the chat data, the loop and the parallelism."""

    batch_unit: ClassVar[str] = "sequences"
    default_output_dir: ClassVar[str] = "checkpoints/sft"

    data: SFTDataConfig = Field(default_factory=SFTDataConfig)

    @model_validator(mode="after")
    def _check_tokenizer(self) -> SFTConfig:
        if self.data.tokenizer_dir is None and self.model.init_from is None:
            raise ValueError(
                "SFT needs the tokenizer of the model it trains: set model.init_from (a model folder with its "
                "tokenizer, e.g. checkpoints/pretrain_final) or data.tokenizer_dir"
            )
        return self


# --------------------------------------------------------------------------------------------
# The tokenizer, its chat template and chat tokens
# --------------------------------------------------------------------------------------------


@dataclass
class ChatTokenizer:
    """The tokenizer SFT encodes with; when its folder has no chat template, ours and the tokens it needs.

    ``added`` maps each chat token the tokenizer lacked to its new id; ``base_size`` is the vocabulary
    before, whose model rows are the "known" tokens new rows are initialised from.
    """

    source: Path
    tokenizer: Tokenizer
    template: str | None  # to write (None: the folder's own template is used as it is)
    added: dict[str, int]
    base_size: int

    @classmethod
    def from_dir(cls, source: str | os.PathLike[str]) -> ChatTokenizer:
        src = Path(source)
        if not (src / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{src}: no tokenizer.json; SFT reads the tokenizer from data.tokenizer_dir or the starting model's "
                "folder (a tokenizer.model-only folder must be converted to tokenizer.json first)"
            )
        tok = load_tokenizer(src)
        base = tok.get_vocab_size(with_added_tokens=True)
        if read_chat_template(src) is not None:
            return cls(src, tok, None, {}, base)
        # No template: ours, starting with the tokenizer's own BOS when it has one.
        bos = special_tokens_map(src).get("bos_token")
        template = CHAT_TEMPLATE
        needed = [SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN]
        if bos is not None and tok.token_to_id(bos) is not None:
            template = CHAT_TEMPLATE.replace(BOS_TOKEN, bos, 1)
        else:
            needed.insert(0, BOS_TOKEN)
        missing = [t for t in needed if tok.token_to_id(t) is None]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        added = {t: tok.token_to_id(t) for t in missing}
        return cls(src, tok, template, added, base)

    @property
    def size(self) -> int:
        """Token ids in use (the model needs at least this many rows)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def write(self, out: Path) -> Path:
        """The tokenizer folder with the template and added tokens, written atomically (temp, rename)."""
        assert self.template is not None
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                if (self.source / name).is_file():
                    shutil.copy2(self.source / name, tmp / name)
            self.tokenizer.save(str(tmp / "tokenizer.json"))
            write_chat_template(tmp, self.template)
            if out.exists():  # ours from an earlier launch (same content for the same inputs)
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def grow_vocabulary(model: nn.Module, vocab_size: int, new_ids: Sequence[int], known: int) -> nn.Module:
    """Give ``model`` ``vocab_size`` embedding and LM-head rows; rows of ``new_ids`` and every added row
    start at the mean of the first ``known`` rows (the tokens the model was trained on).

    Mean initialisation (Hewitt, 2021) keeps the new tokens' logits at an average token's, so the
    model's distribution barely moves until they are trained. Works on a ``meta`` model (shapes only).
    """
    cfg = model.config
    old_vocab = cfg.vocab_size
    if vocab_size < old_vocab:
        raise ValueError(f"cannot shrink the vocabulary from {old_vocab} to {vocab_size}")
    fresh = sorted({*new_ids, *range(old_vocab, vocab_size)})
    known = min(known, old_vocab)

    def resized(weight: torch.Tensor) -> torch.Tensor:
        grown = torch.empty(vocab_size, weight.shape[1], dtype=weight.dtype, device=weight.device)
        if weight.device.type != "meta":
            with torch.no_grad():
                grown[: weight.shape[0]] = weight[:vocab_size]
                grown[fresh] = weight[:known].float().mean(0).to(weight.dtype)
        return grown

    embed = model.model.embed_tokens
    embed.weight = nn.Parameter(resized(embed.weight.detach()), requires_grad=embed.weight.requires_grad)
    embed.num_embeddings = vocab_size
    if not cfg.tie_word_embeddings:
        head = model.lm_head
        head.weight = nn.Parameter(resized(head.weight.detach()), requires_grad=head.weight.requires_grad)
        head.out_features = vocab_size
    model.config = model.model.config = cfg.model_copy(update={"vocab_size": vocab_size})
    model.tie_weights()
    return model


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


class SFTStage(ChatStage):
    """Supervised fine-tuning on chat data (``llm-pipeline sft``)."""

    kind = "sft"
    config_class = SFTConfig
    cfg: SFTConfig

    @cached_property
    def chat_tokenizer(self) -> ChatTokenizer:
        source = self.cfg.data.tokenizer_dir or self.cfg.model.init_from
        assert source is not None  # SFTConfig checks it
        return ChatTokenizer.from_dir(source)

    @classmethod
    def written_tokenizer_dirs(cls, output_dir: Path) -> tuple[Path, ...]:
        return (output_dir / CHAT_TOKENIZER_DIR,)

    @cached_property
    def chat_dir(self) -> Path:
        """The tokenizer folder SFT encodes with and exports: the given one when it has a chat template, else
        ours at ``<output_dir>/chat_tokenizer`` (written by :meth:`build_sources`; known before it is)."""
        chat = self.chat_tokenizer
        return chat.source if chat.template is None else Path(self.cfg.training.output_dir) / CHAT_TOKENIZER_DIR

    def model_config(self) -> ModelConfig:
        cfg = super().model_config()
        chat = self.chat_tokenizer
        if chat.added and chat.size > cfg.vocab_size:
            cfg = cfg.model_copy(update={"vocab_size": math.ceil(chat.size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE})
        return cfg

    def transform(self, model: nn.Module) -> nn.Module:
        chat = self.chat_tokenizer
        if not chat.added:
            return model
        vocab = max(model.config.vocab_size, self.model_config().vocab_size)
        return grow_vocabulary(model, vocab, list(chat.added.values()), known=chat.base_size)

    def _write_chat_dir(self, info: DistInfo) -> None:
        """Ours (template + chat tokens), written by rank 0 when the given tokenizer has no template."""
        chat = self.chat_tokenizer
        if chat.template is None:
            return
        if info.is_main:
            chat.write(self.chat_dir)
            added = ", ".join(f"{t}={i}" for t, i in chat.added.items()) or "none"
            log.info("%s has no chat template: ours in %s (tokens added: %s)", chat.source, self.chat_dir, added)
        barrier()

    def data_builder(self) -> Any:
        from llm_pipeline.data.sft import build_sft_sources

        return build_sft_sources

    def encoding_tokenizer(self) -> Path:
        return self.chat_dir

    def build_sources(self, info: DistInfo, model_cfg: ModelConfig) -> tuple[BatchSource, BatchSource | None]:
        t = self.cfg.training
        self._write_chat_dir(info)
        train, val = self.build_data(info, self.chat_dir)
        report = self.data_report
        if info.is_main:
            out = Path(t.output_dir) / DATA_REPORT
            out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            s = report["train"]
            log.info(
                "sft data: %d examples in %d rows of %d (packing efficiency %.1f%%), %d truncated; rejected %s; "
                "report %s",
                s["examples"], s["rows_per_epoch"], self.cfg.data.max_seq_len, 100 * s["packing_efficiency"],
                s.get("truncated", 0), report["rejected"] or "none", out,
            )  # fmt: skip
        return train, val

    def check_data(self, train_source: BatchSource, model_cfg: ModelConfig) -> None:
        vocab = self.chat_tokenizer.size
        if vocab > model_cfg.vocab_size:
            raise ValueError(
                f"the tokenizer ({self.chat_dir}) has {vocab} tokens but the model has vocab_size "
                f"{model_cfg.vocab_size}: use the tokenizer the model was trained with"
            )
        context = model_cfg.max_position_embeddings
        if self.cfg.data.max_seq_len > context:
            raise ValueError(
                f"data.max_seq_len ({self.cfg.data.max_seq_len}) exceeds the model's context "
                f"(max_position_embeddings {context}); lower data.max_seq_len"
            )

    def build_objective(self, model_cfg: ModelConfig) -> Objective:
        t = self.cfg.training
        return CausalLMObjective(
            t.z_loss_weight,
            chunk_tokens=t.loss_chunk_tokens,
            trained_only=True,  # the LM head runs on assistant tokens only
            document_attention=self.cfg.data.packing,  # padded rows need plain causal attention only
        )

    def tokenizer_dir(self) -> Path | None:
        return self.chat_dir
