"""Accounting without allocating a model: parameters, FLOPs per token, training memory.

The memory estimate is a planning aid (the numbers a careful engineer would write on a
whiteboard), not a measurement: it says plainly when a configuration cannot fit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from llm_pipeline.config import ModelConfig

GiB = 1024**3


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count (tied embeddings counted once)."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
    q_dim, kv_dim = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attn = h * q_dim + 2 * h * kv_dim + q_dim * h
    mlp = 3 * h * f
    per_layer = attn + mlp + 2 * h
    embed = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return cfg.num_hidden_layers * per_layer + h + embed + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of a full row of ``seq_len`` tokens: 6·N + 12·L·H·Q·T.

    N counts the matmul weights: the blocks' projections and the LM head (a matmul even when tied),
    not the embedding (a lookup) nor the norms (elementwise; torchtitan counts them, a 0.004%
    difference at 7B). The second term is attention for a full causal row of length T, not halved
    for causality (PaLM/torchtitan). See :class:`FlopModel` for packed rows, masks and frozen weights.
    """
    return FlopModel.from_config(cfg).training(tokens=1, logit_tokens=1, attention_pairs=seq_len)


@dataclass(frozen=True)
class FlopModel:
    """Model FLOPs of real work, per batch: what MFU divides by the device peak.

    A matmul weight of ``n`` elements costs ``2n`` FLOPs per token forward, ``2n`` backward for the
    gradient of its input, and ``2n`` more for its own gradient only when it is trained, so frozen
    weights (LoRA's base) cost ``4n`` and trained ones ``6n``. The LM head runs only on the tokens whose
    logits are computed. Attention (no weights) costs ``4·L·Hq·D`` per (query, key) pair forward and
    twice that backward; a row of ``T`` tokens counts ``T²`` pairs (torchtitan's convention, not halved
    for causality), a packed row the sum of its documents' squared lengths.
    """

    body_frozen: int  # matmul weights in the blocks that get no gradient
    body_trained: int  # matmul weights in the blocks that are trained (adapters included)
    head: int  # LM head weight elements (a matmul even when tied to the embedding)
    head_trained: bool
    attention: int  # L · Hq · D

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> FlopModel:
        """Every weight trained (pretraining, full fine-tuning)."""
        head = cfg.vocab_size * cfg.hidden_size
        body = count_parameters(cfg) - head - (0 if cfg.tie_word_embeddings else head)
        body -= (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size  # norms are not matmuls
        return cls(body_frozen=0, body_trained=body, head=head, head_trained=True, attention=_attention_factor(cfg))

    @classmethod
    def from_model(cls, model: torch.nn.Module, cfg: ModelConfig) -> FlopModel:
        """Counted from the modules themselves, so adapters and frozen weights are accounted as they are."""
        frozen = trained = 0
        for block in model.model.layers:
            for m in block.modules():
                if isinstance(m, torch.nn.Linear):
                    if m.weight.requires_grad:
                        trained += m.weight.numel()
                    else:
                        frozen += m.weight.numel()
        return cls(
            body_frozen=frozen,
            body_trained=trained,
            head=cfg.vocab_size * cfg.hidden_size,
            head_trained=model.lm_head.weight.requires_grad,
            attention=_attention_factor(cfg),
        )

    def forward(self, *, tokens: float, logit_tokens: float, attention_pairs: float) -> float:
        """FLOPs of one forward (e.g. a reference model's)."""
        body = self.body_frozen + self.body_trained
        return 2.0 * body * tokens + 2.0 * self.head * logit_tokens + 4.0 * self.attention * attention_pairs

    def training(self, *, tokens: float, logit_tokens: float, attention_pairs: float) -> float:
        """FLOPs of forward + backward."""
        body = 4.0 * self.body_frozen + 6.0 * self.body_trained
        head = (6.0 if self.head_trained else 4.0) * self.head
        return body * tokens + head * logit_tokens + 12.0 * self.attention * attention_pairs


def _attention_factor(cfg: ModelConfig) -> int:
    return cfg.num_hidden_layers * cfg.num_attention_heads * cfg.resolved_head_dim


Sharding = Literal["full", "none"]
Checkpointing = Literal["none", "selective", "full"]


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU training memory in bytes, by component."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    transient: float
    total: float
    gpu_memory: float
    fits: bool

    def as_gib(self) -> dict[str, float | bool]:
        return {k: (v / GiB if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _activation_bytes_per_token_per_layer(cfg: ModelConfig, act_bytes: int) -> float:
    """Tensors a block saves for backward with flash attention (no T² score matrix).

    Saved: block input, two norm outputs, q/k/v, attention output, residual after attention,
    gate/up/silu/product (4·F), fp32 RMS statistics negligible.
    """
    h, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * cfg.resolved_head_dim
    q = cfg.num_attention_heads * cfg.resolved_head_dim
    elems = 4 * h + q + 2 * kv + q + 4 * f
    return float(elems * act_bytes)


def estimate_training_memory(
    cfg: ModelConfig,
    *,
    num_gpus: int = 1,
    micro_batch_size: int = 1,
    seq_len: int | None = None,
    sharding: Sharding = "full",
    activation_checkpointing: Checkpointing = "none",
    gpu_memory_gib: float = 80.0,
    param_bytes: int = 4,
    act_bytes: int = 2,
) -> MemoryEstimate:
    """Per-GPU memory for AdamW training with fp32 master weights and bf16 compute.

    With ``sharding="full"`` (FSDP2/ZeRO-3) weights, gradients and the two AdamW moments are
    divided across ``num_gpus``; each GPU also holds one or two gathered bf16 blocks at a time.
    """
    if num_gpus < 1 or micro_batch_size < 1:
        raise ValueError("num_gpus and micro_batch_size must be >= 1")
    t = seq_len or cfg.max_position_embeddings
    n = count_parameters(cfg)
    shard = num_gpus if sharding == "full" else 1
    weights = n * param_bytes / shard
    gradients = n * param_bytes / shard
    optimizer = 2 * n * 4 / shard  # AdamW exp_avg + exp_avg_sq in fp32
    tokens = micro_batch_size * t
    per_layer = _activation_bytes_per_token_per_layer(cfg, act_bytes) * tokens
    layer_input = cfg.hidden_size * act_bytes * tokens
    if activation_checkpointing == "full":
        activations = cfg.num_hidden_layers * layer_input + per_layer
    elif activation_checkpointing == "selective":  # every other block recomputed
        kept = (cfg.num_hidden_layers + 1) // 2
        activations = kept * per_layer + (cfg.num_hidden_layers - kept) * layer_input + per_layer
    else:
        activations = cfg.num_hidden_layers * per_layer
    logits = 2 * tokens * cfg.vocab_size * 4  # fp32 logits and their gradient
    block = count_parameters(cfg) / cfg.num_hidden_layers * act_bytes
    transient = 2 * block if sharding == "full" and num_gpus > 1 else 0.0  # prefetched gathered blocks
    transient += 1.0 * GiB  # CUDA context, allocator fragmentation, workspace
    total = weights + gradients + optimizer + activations + logits + transient
    gpu = gpu_memory_gib * GiB
    return MemoryEstimate(
        weights=float(weights),
        gradients=float(gradients),
        optimizer=float(optimizer),
        activations=float(activations),
        logits=float(logits),
        transient=float(transient),
        total=float(total),
        gpu_memory=float(gpu),
        fits=total <= gpu * 0.95,
    )


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32, device: str = "cpu", size: int = 2048, min_seconds: float = 0.05
) -> float:
    """Achievable matmul FLOP/s on this device: the denominator of MFU where no spec sheet applies (CPUs).

    Square products grow from 256 up to ``size`` until one takes ``min_seconds``: a CPU without bf16 units
    takes tens of seconds for one bf16 product at 2048 (minutes for the whole measurement, at every stage
    start), while a product of ``min_seconds`` already measures its rate.
    """

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    n, rate = 256, 0.0
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up (kernel selection, caches)
        sync()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
        rate = max(rate, 2 * n**3 / best)
        if best >= min_seconds or n >= size:
            return rate
        n *= 2
