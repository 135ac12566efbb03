"""Perplexity and bits per byte on text/JSONL files and on held-out packed token shards.

Text: every document is tokenised on its own, prefixed with the tokenizer's BOS (or EOS) token so
its first real token is predicted too, and cut into windows of ``seq_len`` predictions that overlap
by one token: every token is scored exactly once. Bits per byte divide the summed negative
log-likelihood (in bits) by the UTF-8 bytes of the documents, which makes models with different
tokenizers comparable; perplexity is per token of *this* tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from llm_pipeline.eval.availability import missing_files
from llm_pipeline.eval.budget import Budget
from llm_pipeline.eval.records import read_jsonl
from llm_pipeline.eval.task import EvalTask, Metrics, Samples, TaskConfig, TaskContext

if TYPE_CHECKING:
    import torch


class PerplexityConfig(TaskConfig):
    """Perplexity and bits per byte on held-out packed data and/or text files."""

    timeout_s: float = Field(1800.0, gt=0, description="Wall-clock budget for this eval.")
    files: list[str] = Field(
        default_factory=list, description="Text (.txt) or JSONL files; one document per file/line."
    )
    text_field: str = Field("text", description="JSONL field holding the document text.")
    packed_data: str | None = Field(None, description="Root of packed token shards (with manifest.json).")
    split: str = Field("val", description="Split of the packed data to score.")
    seq_len: int = Field(1024, gt=1, description="Tokens per scored window (capped at the model context).")
    batch_size: int = Field(8, gt=0)


PREFIX_TOKENS = ("<|bos|>", "<s>", "<|begin_of_text|>", "<|eos|>", "<|endoftext|>", "</s>")


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """A .jsonl(.gz) file yields one document per line (``text_field``); any other file is one document."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: perplexity file not found")
    if p.name.endswith((".jsonl", ".jsonl.gz")):
        for n, row in enumerate(read_jsonl(p), 1):
            if text_field not in row:
                raise ValueError(f"{p}: record {n}: no '{text_field}' field (set perplexity.text_field)")
            yield str(row[text_field])
    else:
        yield p.read_text(encoding="utf-8")


def prefix_token_id(tokenizer: Any) -> int | None:
    for tok in PREFIX_TOKENS:
        idx = tokenizer.token_to_id(tok)
        if idx is not None:
            return int(idx)
    return None


def document_windows(ids: Sequence[int], prefix: int | None, seq_len: int) -> list[list[int]]:
    """Windows of at most ``seq_len + 1`` tokens overlapping by one: each token is a target once."""
    tokens = ([prefix] if prefix is not None else []) + list(ids)
    return [tokens[i : i + seq_len + 1] for i in range(0, max(len(tokens) - 1, 0), seq_len)]


def score_windows(
    model: torch.nn.Module,
    windows: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    budget: Budget | None = None,
) -> list[float]:
    """Summed next-token NLL (nats) of each window (inputs ``w[:-1]``, targets ``w[1:]``)."""
    import torch

    param = next(model.parameters())
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    out = [0.0] * len(windows)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                if budget is not None:
                    budget.check()
                idx = order[start : start + batch_size]
                width = len(windows[idx[0]]) - 1
                ids = torch.zeros((len(idx), width), dtype=torch.long, device=param.device)
                for row, i in enumerate(idx):
                    w = windows[i]
                    ids[row, : len(w) - 1] = torch.tensor(w[:-1])
                hidden = model.model(ids)  # [B, T, H]; right padding is invisible to causal attention
                for row, i in enumerate(idx):
                    w = windows[i]
                    logits = model.lm_head(hidden[row, : len(w) - 1]).float()  # [T_i, V], one row at a time
                    target = torch.tensor(w[1:], device=logits.device)
                    out[i] = torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
                if budget is not None:
                    budget.advance(len(idx))
    finally:
        model.train(was_training)
    return out


def summarize(nll: float, tokens: int, n_bytes: int) -> dict[str, float | int]:
    return {
        "perplexity": math.exp(nll / tokens) if tokens else float("nan"),
        "nll_per_token": nll / tokens if tokens else float("nan"),
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else float("nan"),
        "tokens": tokens,
        "bytes": n_bytes,
    }


def text_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    documents: Sequence[str],
    *,
    seq_len: int = 1024,
    batch_size: int = 8,
    budget: Budget | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Corpus-level perplexity / bits per byte and a record per document."""
    seq_len = min(seq_len, model.config.max_position_embeddings)
    prefix = prefix_token_id(tokenizer)
    windows, owner, doc_tokens = [], [], []
    for d, text in enumerate(documents):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        ws = document_windows(ids, prefix, seq_len)
        windows.extend(ws)
        owner.extend([d] * len(ws))
        doc_tokens.append(sum(len(w) - 1 for w in ws))
    if budget is not None:
        budget.set_total(len(windows), "score")
    nlls = score_windows(model, windows, batch_size=batch_size, budget=budget)
    doc_nll = [0.0] * len(documents)
    for d, v in zip(owner, nlls, strict=True):
        doc_nll[d] += v
    records = []
    for d, text in enumerate(documents):
        rec = {"doc": d, **summarize(doc_nll[d], doc_tokens[d], len(text.encode("utf-8")))}
        rec["nll"] = doc_nll[d]
        records.append(rec)
    metrics = summarize(sum(doc_nll), sum(doc_tokens), sum(len(t.encode("utf-8")) for t in documents))
    metrics["documents"] = len(documents)
    return metrics, records


def packed_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    root: str | Path,
    *,
    split: str = "val",
    seq_len: int = 1024,
    batch_size: int = 8,
    limit: int | None = None,
    budget: Budget | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The held-out split of packed shards (``<|bos|> text <|eos|>`` documents), document by document.

    The BOS token conditions the first text token; the closing EOS is not scored, so the scored
    tokens are exactly the text's and bits per byte use the bytes they decode to (exact for
    byte-level BPE). The manifest's byte count of the split is reported beside it.
    """
    from llm_pipeline.data.loader import PackedTokenDataset

    ds = PackedTokenDataset(root, split=split)
    seq_len = min(seq_len, model.config.max_position_embeddings)
    eos = ds.manifest.get("eos_id")
    n_docs = ds.num_documents if limit is None else min(limit, ds.num_documents)
    windows, owner, doc_tokens, doc_bytes = [], [], [], []
    for d in range(n_docs):
        toks = ds.document(d).tolist()
        if eos is not None and toks and toks[-1] == eos:
            toks = toks[:-1]
        if len(toks) < 2:
            doc_tokens.append(0)
            doc_bytes.append(0)
            continue
        ws = document_windows(toks[1:], toks[0], seq_len)
        windows.extend(ws)
        owner.extend([d] * len(ws))
        doc_tokens.append(len(toks) - 1)
        doc_bytes.append(len(tokenizer.decode(toks[1:], skip_special_tokens=False).encode("utf-8")))
    if budget is not None:
        budget.set_total(len(windows), "score")
    nlls = score_windows(model, windows, batch_size=batch_size, budget=budget)
    doc_nll = [0.0] * n_docs
    for d, v in zip(owner, nlls, strict=True):
        doc_nll[d] += v
    records = [
        {"source": f"{root}:{split}", "doc": d, "nll": doc_nll[d], **summarize(doc_nll[d], doc_tokens[d], doc_bytes[d])}
        for d in range(n_docs)
    ]
    metrics: dict[str, Any] = summarize(sum(doc_nll), sum(doc_tokens), sum(doc_bytes))
    metrics["documents"] = n_docs
    metrics["split_documents"] = ds.num_documents
    metrics["split_bytes_manifest"] = ds.manifest["splits"][split].get("bytes")
    return metrics, records


def run_perplexity(
    cfg: PerplexityConfig,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    limit: int | None = None,
    budget: Budget | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each configured source scored separately: ``metrics[source] = {...}``."""
    if not cfg.files and not cfg.packed_data:
        raise ValueError(
            "perplexity: nothing to score; set perplexity.files (text/JSONL) or perplexity.packed_data (packed shards)"
        )
    metrics: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    for f in cfg.files:
        docs = []
        for text in read_documents(f, cfg.text_field):
            if limit is not None and len(docs) >= limit:
                break
            docs.append(text)
        m, recs = text_perplexity(model, tokenizer, docs, seq_len=cfg.seq_len, batch_size=cfg.batch_size, budget=budget)
        if not m["tokens"]:
            raise ValueError(f"{f}: no text to score (the file or its '{cfg.text_field}' fields are empty)")
        metrics[str(f)] = m
        records.extend({"source": str(f), **r} for r in recs)
    if cfg.packed_data:
        m, recs = packed_perplexity(
            model,
            tokenizer,
            cfg.packed_data,
            split=cfg.split,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            limit=limit,
            budget=budget,
        )
        if not m["tokens"]:
            raise ValueError(f"{cfg.packed_data}: split '{cfg.split}' has no document to score")
        metrics[f"{cfg.packed_data}:{cfg.split}"] = m
        records.extend(recs)
    return metrics, records


class PerplexityTask(EvalTask[PerplexityConfig]):
    """Each source scored on its own; the first source's numbers are the task's (gates, report)."""

    config_class = PerplexityConfig
    headline = ("perplexity", "bits_per_byte")

    def run(self, ctx: TaskContext) -> tuple[Metrics, Samples]:
        model, tokenizer = ctx.model.get()
        return run_perplexity(self.cfg, model, tokenizer, limit=ctx.limit, budget=ctx.budget)

    def unavailable(self) -> str | None:
        pc = self.cfg
        if missing := missing_files(pc.files):
            return f"text file(s) not found: {', '.join(missing)}"
        if pc.files:
            return None
        if pc.packed_data and (Path(pc.packed_data) / "manifest.json").is_file():
            return None
        where = f" ({pc.packed_data} has no packed shards)" if pc.packed_data else ""
        return f"no held-out data to score{where}: pass --packed-data DIR (a data run's packed/) or --text FILE"

    def run_defaults(self, run_dir: Path) -> dict[str, Any]:
        """The held-out split the run's data step packed."""
        packed = run_dir / "data" / "packed"
        return {"packed_data": str(packed)} if (packed / "manifest.json").is_file() else {}

    def scalars(self, metrics: Mapping[str, Any] | None) -> dict[str, float | int]:
        first = next((v for v in (metrics or {}).values() if isinstance(v, Mapping)), None)
        return super().scalars(first)

    def count(self, scalars: Mapping[str, float | int]) -> int | None:
        n = scalars.get("documents")
        return int(n) if n is not None else None
