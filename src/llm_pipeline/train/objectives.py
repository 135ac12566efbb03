"""Objectives: what a stage optimises, separate from how the loop runs.

A stage is a config plus an :class:`Objective`. The objective says how many loss *units* a batch
holds (label tokens for language modelling, pairs for preference losses) and returns the *sum* of
its loss over them; the trainer divides by the units of the whole global batch (all
micro-batches, all ranks). That makes gradient accumulation, data parallelism and the OOM
fallback (smaller micro-batches) exact: the gradient does not depend on how a step is split.

The objective also prices its batch (:meth:`Objective.cost`): the real tokens the model processed
and the model FLOPs spent, so tokens/s and MFU are honest for padded, masked and paired batches.

The LM head and its cross-entropy run in chunks of tokens (:func:`lm_head_loss`,
:func:`token_logprobs`): a step never holds fp32 logits for the whole micro-batch, only for one
chunk, recomputed in backward. Values and gradients equal the unchunked computation.

A new objective (SFT, DPO, ...) is a small subclass; it never copies the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_pipeline.model.flops import FlopModel
from llm_pipeline.model.kernels import matmul_dtype, round_to_

Batch = dict[str, torch.Tensor]
IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 2048
#: On CPU, a chunk's fp32 logits stay under this size: freed chunks are reused from the heap (larger
#: blocks are mapped afresh and page-faulted on every chunk) and stay closer to the caches.
CPU_CHUNK_BYTES = 16 * 2**20


@dataclass
class ObjectiveOutput:
    """``loss_sum`` is differentiated; ``metric_sums`` are detached sums, averaged over units by the trainer."""

    loss_sum: torch.Tensor
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchCost:
    """What a micro-batch costs: real (non-padding) tokens through the model and model FLOPs."""

    tokens: int
    flops: float

    def __add__(self, other: BatchCost) -> BatchCost:
        return BatchCost(self.tokens + other.tokens, self.flops + other.flops)


class Objective(ABC):
    """Loss and batch format of one training stage."""

    #: Metric whose exp() is reported as perplexity (None: the objective has no perplexity).
    perplexity_of: str | None = None
    #: (metric, format) pairs of its own metrics shown on the console line after the loss.
    console_metrics: tuple[tuple[str, str], ...] = ()

    @abstractmethod
    def count(self, batch: Batch) -> int:
        """Loss units in ``batch`` (computed before the forward, so normalisers are known up front)."""

    @abstractmethod
    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        """Forward ``batch`` through ``model``; return the summed loss and metric sums."""

    def cost(self, batch: Batch, flops: FlopModel) -> BatchCost:
        """Tokens and FLOPs of one training forward + backward over ``batch`` (a causal LM over its rows)."""
        tokens, pairs = sequence_extent(batch["input_ids"], batch.get("document_ids"))
        return BatchCost(tokens, flops.training(tokens=tokens, logit_tokens=tokens, attention_pairs=pairs))

    def state_dict(self) -> dict[str, Any]:
        """Objective state that must survive a resume (saved per rank with the checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict`."""


def sequence_extent(input_ids: torch.Tensor, document_ids: torch.Tensor | None) -> tuple[int, int]:
    """(real tokens, attention query-key pairs) of a batch of rows.

    Without ``document_ids`` every row is one sequence of T tokens (T² pairs). With them, each
    row's segments (ids >= 0; -1 marks padding) attend only within themselves: the pairs are the
    sum of squared segment lengths, and padding counts for nothing.
    """
    b, t = input_ids.shape
    if document_ids is None:
        return b * t, b * t * t
    docs = document_ids.to("cpu", torch.int64)
    real = docs >= 0
    keys = (docs + torch.arange(b).unsqueeze(1) * (t + 1))[real]  # a distinct id per (row, segment)
    lengths = torch.bincount(keys)
    return int(real.sum()), int((lengths * lengths).sum())


# --------------------------------------------------------------------------------------------
# The LM head in chunks
# --------------------------------------------------------------------------------------------


def _chunked(fn: Callable[..., Any], n: int, chunk_tokens: int, *tensors: torch.Tensor) -> list[Any]:
    """``fn`` over row-chunks of ``tensors``; with more than one chunk each is recomputed in backward,
    so only one chunk's logits are ever alive. A single chunk runs plainly (no recompute)."""
    if chunk_tokens <= 0 or n <= chunk_tokens:
        return [fn(*tensors)]
    return [
        checkpoint(fn, *(t[i : i + chunk_tokens] for t in tensors), use_reentrant=False)
        for i in range(0, n, chunk_tokens)
    ]


#: ``trained_only`` rounds its row count up to a multiple of this with ignored rows. The count changes
#: with every batch, and CPU matmul libraries (oneDNN) cache kernels per shape: without the rounding
#: memory grows with every new count (measured: ~10 MB per step of the demo's SFT). Costs < 128 head rows.
TRAINED_ROW_MULTIPLE = 128


def _trained_rows(hidden: torch.Tensor, labels: torch.Tensor, trained_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten [B, T, H] / [B, T] to rows; with ``trained_only`` keep the rows that have a label (first,
    in order), then ignored rows up to a multiple of :data:`TRAINED_ROW_MULTIPLE`."""
    h, y = hidden.flatten(0, 1), labels.flatten()
    if trained_only:
        keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
        pad = -len(keep) % TRAINED_ROW_MULTIPLE
        h = h.index_select(0, torch.cat([keep, keep.new_zeros(pad)]))  # padding repeats row 0: no gradient
        y = torch.cat([y.index_select(0, keep), y.new_full((pad,), IGNORE_INDEX)])
    return h, y


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum CE + z_weight · sum logsumexp²`` of ``hidden @ weight.T`` over labelled rows, chunk by chunk.

    The loss is a plain sum, so its gradient is known up to the scalar coming from above: each chunk's
    logits give their gradients at once (softmax - one-hot, plus the z-loss term) and are freed, so
    only one chunk of fp32 logits ever exists and nothing is recomputed in backward (as Liger's fused
    linear cross-entropy, on any device). Matmuls run in the autocast dtype when autocast is on, as
    the plain head would; the weight gradient accumulates in fp32.

    Each chunk makes one pass of ``exp``, in place in one logits buffer reused by every chunk: its row sums
    give the logsumexp and, scaled, the softmax of the gradient (with the z-loss factor in the same pass).
    The weight gradient accumulates in place (``addmm_``), without a [vocab, hidden] temporary per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, z_weight: float, chunk: int):  # type: ignore[override]
        dev = hidden.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        mdt = matmul_dtype(cdt, hidden.device)  # fp32 where bf16 is emulated (bf16-rounded operands)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        sums = torch.zeros(2, device=hidden.device, dtype=torch.float32)  # ce, z
        with torch.autocast(dev, enabled=False):
            w, hs = weight.to(cdt).to(mdt), hidden.to(cdt).to(mdt)  # rounded once, not per chunk
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
            # One fp32 logits buffer for every chunk: no fresh [C, V] allocation (page faults on CPU) per chunk.
            buf = hidden.new_empty((min(chunk, hidden.shape[0]), weight.shape[0]), dtype=torch.float32)
            for i in range(0, hidden.shape[0], chunk):
                h, y = hs[i : i + chunk], labels[i : i + chunk]
                logits = buf[: h.shape[0]]  # [C, V]
                if mdt == torch.float32:
                    round_to_(torch.mm(h, w.T, out=logits), cdt)
                else:
                    logits.copy_(h @ w.T)
                valid = y != IGNORE_INDEX
                target = y.clamp_min(0)
                picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
                # one exp, in place: e = exp(logits - max); its row sums (torch.sum's accurate cascade) give
                # logsumexp, and e scaled by (1 + 2z·lse) / sum is d/dlogits of CE + z·lse² before the one-hot
                top = logits.amax(1, keepdim=True)
                e = logits.sub_(top).exp_()
                total = e.sum(1)
                lse = top.squeeze(1) + total.log()
                sums[0] += ((lse - picked) * valid).sum()
                sums[1] += (lse.pow(2) * valid).sum()
                if grad_h is None and grad_w is None:
                    continue
                # d = softmax·(1 + 2z·lse) - onehot on labelled rows, 0 on the others, in the logits' own
                # buffer (no second [C, V] tensor: less memory traffic, fewer page faults): one pass, as the
                # row scale is 0 on unlabelled rows and the one-hot is added there as 0.
                keep = valid.to(e.dtype)
                scale = (1 + 2 * z_weight * lse) * keep / total if z_weight else keep / total
                d = e.mul_(scale.unsqueeze(1)).scatter_add_(1, target.unsqueeze(1), -keep.unsqueeze(1))
                d = round_to_(d, cdt) if mdt == torch.float32 else d.to(mdt)
                if grad_h is not None:
                    if grad_h.dtype == mdt:
                        round_to_(torch.mm(d, w, out=grad_h[i : i + chunk]), cdt)
                    else:
                        grad_h[i : i + chunk] = d @ w
                if grad_w is not None:
                    if mdt == torch.float32:
                        grad_w.addmm_(d.T, h)
                    else:
                        grad_w += (d.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        loss = sums[0] + z_weight * sums[1]
        return loss, sums[0].clone(), sums[1].clone()

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        g_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        g_w = (grad_w * grad_loss.float()).to(ctx.weight_dtype) if grad_w is not None else None
        return g_h, g_w, None, None, None


def lm_head_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss_weight: float = 0.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    trained_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, ce, z): summed cross-entropy of ``labels`` under ``head(hidden)`` plus ``z_loss_weight``
    times the summed z-loss ``logsumexp²``; ``ce`` and ``z`` are detached metric sums (z None when off).

    ``trained_only`` runs the head on labelled positions only (SFT's masked prompts cost no head
    FLOPs). A plain head (``nn.Linear`` without bias) with ``chunk_tokens`` > 0 always goes through the
    fused function, whatever the row count (``chunk_tokens`` rows per chunk; on CPU a chunk's fp32 logits
    are capped at ``CPU_CHUNK_BYTES``): fp32 logits exist for one chunk at a time, no log-softmax is
    kept. Another head (e.g. with adapters) runs in plain autograd, chunk by chunk above ``chunk_tokens``
    rows (0 = never chunk). Values and gradients equal the plain computation.
    """
    h, y = _trained_rows(hidden, labels, trained_only)
    n = h.shape[0]
    plain_head = type(head) is nn.Linear and head.bias is None
    if chunk_tokens > 0 and plain_head:
        # Even one chunk goes through the fused function: no log-softmax tensor, no recompute. On CPU a chunk
        # of fp32 logits stays within CPU_CHUNK_BYTES (measured: the head's step 1.1x faster than 64 MB chunks).
        if hidden.device.type == "cpu":
            chunk_tokens = min(chunk_tokens, max(TRAINED_ROW_MULTIPLE, CPU_CHUNK_BYTES // (4 * head.weight.shape[0])))
        loss, ce, z = _ChunkedLinearCrossEntropy.apply(h, head.weight, y, z_loss_weight, chunk_tokens)
        return loss, ce.detach(), (z.detach() if z_loss_weight > 0 else None)

    def chunk(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float()  # [C, V]
        ce = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
        if z_loss_weight <= 0:
            return ce, ce.new_zeros(())
        return ce, torch.logsumexp(logits, dim=-1)[y != IGNORE_INDEX].pow(2).sum()

    # One chunk (or a wrapped head, e.g. with adapters): plain autograd, chunks recomputed in backward.
    parts = _chunked(chunk, n, chunk_tokens, h, y)
    ce = parts[0][0] if len(parts) == 1 else torch.stack([p[0] for p in parts]).sum()
    if z_loss_weight <= 0:
        return ce, ce.detach(), None
    z = parts[0][1] if len(parts) == 1 else torch.stack([p[1] for p in parts]).sum()
    return ce + z_loss_weight * z, ce.detach(), z.detach()


def token_logprobs(
    head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """log p(label) per position [B, T] in fp32, 0 where the label is -100 (DPO's sequence log-probs).

    The head runs on labelled positions only, in chunks.
    """

    def chunk(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(head(h).float(), y, reduction="none")

    h, y = _trained_rows(hidden, labels, trained_only=True)
    out = hidden.new_zeros(labels.numel(), dtype=torch.float32)
    keep = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
    if len(keep):
        logp = torch.cat(_chunked(chunk, h.shape[0], chunk_tokens, h, y))[: len(keep)]
        out = out.index_put((keep,), logp)
    return out.view_as(labels)


# --------------------------------------------------------------------------------------------
# Causal language modelling (pretraining; SFT with trained_only)
# --------------------------------------------------------------------------------------------


class CausalLMObjective(Objective):
    """Next-token cross-entropy over rows, with optional z-loss.

    Batch: ``input_ids`` [B, T], ``labels`` [B, T] (already shifted targets, -100 = no loss) and
    optionally ``document_ids`` [B, T] for per-document attention (-1 marks padding). The z-loss
    (``weight · logsumexp(logits)²``, PaLM) keeps the softmax normaliser near 0 for bf16 stability.
    ``trained_only`` applies the LM head to labelled positions only (prompts masked in SFT).
    """

    perplexity_of = "ce"

    def __init__(
        self,
        z_loss_weight: float = 0.0,
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        trained_only: bool = False,
        document_attention: bool = True,
    ) -> None:
        self.z_loss_weight = z_loss_weight
        self.chunk_tokens = chunk_tokens
        self.trained_only = trained_only
        self.document_attention = document_attention

    def count(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        def head_fn(hidden: torch.Tensor, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            return lm_head_loss(
                head,
                hidden,
                batch["labels"],
                z_loss_weight=self.z_loss_weight,
                chunk_tokens=self.chunk_tokens,
                trained_only=self.trained_only,
            )

        docs = batch.get("document_ids") if self.document_attention else None
        loss, ce, z = model(batch["input_ids"], document_ids=docs, head_fn=head_fn)
        metrics = {"ce": ce}
        if z is not None:
            metrics["z_loss"] = z
        return ObjectiveOutput(loss_sum=loss, metric_sums=metrics)

    def cost(self, batch: Batch, flops: FlopModel) -> BatchCost:
        tokens, pairs = sequence_extent(batch["input_ids"], batch.get("document_ids"))
        logit_tokens = self.count(batch) if self.trained_only else batch["input_ids"].numel()
        return BatchCost(tokens, flops.training(tokens=tokens, logit_tokens=logit_tokens, attention_pairs=pairs))
