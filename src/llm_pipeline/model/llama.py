"""LLaMA architecture: RMSNorm, RoPE, grouped-query attention, SwiGLU. Architecture only.

Module and parameter names follow HF ``transformers`` ``LlamaForCausalLM`` exactly and RoPE uses
its rotate-half convention, so a state dict moves between the two without renaming. Training,
data and I/O live elsewhere; parallelism (FSDP, compile, checkpointing) is applied from outside
to ``model.model.layers``.

Shape legend: B batch, T new tokens, S keys (cache + new), H hidden, Nq/Nkv heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from llm_pipeline.config import ModelConfig
from llm_pipeline.model.kernels import attention, linear

DocAttention = Literal["auto", "flex", "segments", "dense"]
HeadOut = TypeVar("HeadOut")


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled by a learned weight (as in HF LLaMA)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``position_ids`` [B, T] -> two [B, T, D] tensors, computed in fp32."""
    device = position_ids.device
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    with torch.autocast(device_type=device.type, enabled=False):
        freqs = position_ids.float()[..., None] * inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, N, T, D] by the tables [B, T, D] (HF rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the document id changes along a packed row."""
    _, t = document_ids.shape
    idx = torch.arange(t, device=document_ids.device).expand_as(document_ids)
    starts = torch.zeros_like(idx)
    starts[:, 1:] = torch.where(document_ids[:, 1:] != document_ids[:, :-1], idx[:, 1:], 0)
    return idx - torch.cummax(starts, dim=1).values


class KVCache:
    """Preallocated keys/values per layer for incremental decoding."""

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.resolved_head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0  # tokens already stored
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k/v [B, Nkv, T, D] after the cached ones; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class AttentionMask:
    """How attention is restricted for one forward: plain causal, a dense mask, a flex block mask, or
    the documents of packed rows grouped by length (``segments``; compiled code gets the dense mask)."""

    def __init__(
        self,
        *,
        causal: bool = False,
        dense: torch.Tensor | None = None,
        block: object = None,
        segments: DocumentSegments | None = None,
    ):
        self.causal = causal
        self.dense = dense  # bool [B, 1, T, S], True = may attend
        self.block = block  # flex_attention BlockMask
        self.segments = segments  # the packed documents, grouped by length

    @classmethod
    def build(
        cls,
        *,
        batch: int,
        q_len: int,
        past: int,
        device: torch.device,
        document_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        doc_attention: DocAttention,
    ) -> AttentionMask:
        if document_ids is not None and past == 0 and attention_mask is None:
            if doc_attention == "flex" or (doc_attention == "auto" and device.type == "cuda"):
                return cls(block=_document_block_mask(document_ids))
            segments = doc_attention == "segments" or (doc_attention == "auto" and device.type == "cpu")
            if segments and not torch.compiler.is_compiling():  # compiled code: the dense mask below
                return cls(segments=DocumentSegments(document_ids))
        if document_ids is None and attention_mask is None:
            if past == 0:
                return cls(causal=True)
            if q_len == 1:
                return cls()  # one new token attends to everything cached
        if document_ids is None and attention_mask is not None and q_len == 1:
            # One new token (a decode step): the padding mask, and the token always sees itself; the
            # general case below builds the same mask in ~10 small ops a step.
            mask = attention_mask[:, None, None, :] != 0  # [B, 1, 1, S]
            mask[..., -1] = True
            return cls(dense=mask)
        # General case: causal with offset, padding and/or document boundaries, as a dense mask.
        q_pos = torch.arange(past, past + q_len, device=device)
        k_pos = torch.arange(past + q_len, device=device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, T, S]
        if attention_mask is not None:  # [B, S] with 1 for real tokens
            mask = mask & attention_mask[:, None, None, :].bool()
            # A pad query would see nothing and SDPA would return NaN; let it see itself (ignored).
            mask = mask | (k_pos[None, :] == q_pos[:, None])[None, None]
        if document_ids is not None:
            if past:
                raise ValueError("document_ids cannot be combined with a KV cache")
            same = document_ids[:, :, None] == document_ids[:, None, :]
            mask = mask & same[:, None]
        return cls(dense=mask.expand(batch, 1, q_len, past + q_len))


class DocumentSegments:
    """The documents of packed rows grouped by length for one SDPA call per group (CPU, or no flex).

    Each document (a run of equal ids >= 0 along a row) is gathered from the flattened [B*T] tokens
    into a row of its group's width (four widths per octave, at least 16), right-padded by repeating
    its last token. A causal kernel over that row is exact for the document's own queries: they never
    see the padding after them. The outputs of real tokens are gathered back; padding tokens get 0.
    The work is the sum over documents of their padded squared lengths, not T² per row. All groups
    share one gather of q/k/v and one gather back (backward: one index_add each, not one per group).
    """

    def __init__(self, document_ids: torch.Tensor) -> None:
        b, t = document_ids.shape
        docs = document_ids.cpu()
        cut = torch.ones(b, t, dtype=torch.bool)
        cut[:, 1:] = docs[:, 1:] != docs[:, :-1]
        row, start = cut.nonzero(as_tuple=True)
        flat_start = row * t + start
        ends = torch.cat([flat_start[1:], torch.tensor([b * t])])  # every row starts a run at its position 0
        keep = docs[row, start] >= 0
        starts, lengths = flat_start[keep], (ends - flat_start)[keep]
        # Group widths: four steps per octave (a document is padded by at most a quarter of its length).
        step = (2 ** (torch.floor(torch.log2(lengths.clamp(min=16).double())) - 2)).long()
        width = (((lengths + step - 1) // step) * step).clamp(max=t)
        self.groups: list[tuple[int, int]] = []  # (width, gathered tokens n_docs * width), in gather order
        gathers = []
        # Where each of the B*T tokens finds its output in the groups' concatenated outputs; padding
        # tokens point one past the end, at a zero row.
        total = 0
        back = torch.empty(b * t, dtype=torch.long)
        back[docs.flatten() < 0] = -1
        for w in sorted(set(width.tolist())):
            sel = width == w
            offs = torch.arange(w)
            idx = (starts[sel, None] + torch.minimum(offs[None], lengths[sel, None] - 1)).flatten()  # [n * w]
            valid = (offs[None] < lengths[sel, None]).flatten().nonzero().squeeze(1)  # real tokens within idx
            back[idx[valid]] = valid + total
            gathers.append(idx)
            self.groups.append((w, len(idx)))
            total += len(idx)
        back[back < 0] = total
        dev = document_ids.device
        self.gather = torch.cat(gathers).to(dev) if gathers else torch.zeros(0, dtype=torch.long, device=dev)
        self.back = back.to(dev)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """q [B, Nq, T, D], k/v [B, Nkv, T, D] -> [B, Nq, T, D]."""
        b, n, t, d = q.shape
        sizes = [size for _, size in self.groups]
        # index_select: its backward is one index_add, the fast one on CPU
        qa, ka, va = (x.transpose(1, 2).reshape(b * t, x.shape[1], d).index_select(0, self.gather) for x in (q, k, v))
        outs = []
        for (w, _), qs, ks, vs in zip(self.groups, qa.split(sizes), ka.split(sizes), va.split(sizes), strict=True):
            qs, ks, vs = (x.view(-1, w, x.shape[1], d).transpose(1, 2) for x in (qs, ks, vs))
            o = attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)  # [docs, Nq, w, D]
            outs.append(o.transpose(1, 2).reshape(-1, n, d))
        outs.append((outs[0] if outs else q).new_zeros(1, n, d))  # what padding tokens get
        out = torch.cat(outs).index_select(0, self.back)  # [B*T, Nq, D]
        return out.view(b, t, n, d).transpose(1, 2)


def _document_block_mask(document_ids: torch.Tensor) -> object:
    """Block-causal document mask for flex_attention: skips fully masked blocks entirely."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = document_ids

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    b, t = docs.shape
    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=t, KV_LEN=t, device=docs.device)


_compiled_flex = None


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: object) -> torch.Tensor:
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if q.is_cuda:  # flex is only fast when compiled; on CPU eager is fine for tests
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block, enable_gqa=k.shape[1] != q.shape[1])


class LlamaAttention(nn.Module):
    """Grouped-query self-attention through SDPA (FlashAttention kernels on GPU)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = linear(self.q_proj, x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Nq, T, D]
        k = linear(self.k_proj, x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Nkv, T, D]
        v = linear(self.v_proj, x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Nkv, S, D]
        gqa = self.n_kv != self.n_heads
        if mask.block is not None:
            out = _flex_attention(q, k, v, mask.block)
        elif mask.segments is not None:
            out = mask.segments.attend(q, k, v, gqa)
        else:
            out = attention(q, k, v, attn_mask=mask.dense, is_causal=mask.causal, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # [B, T, Nq*D]
        return linear(self.o_proj, out)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.down_proj, F.silu(linear(self.gate_proj, x)) * linear(self.up_proj, x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder stack and final norm; returns hidden states [B, T, H]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.doc_attention: DocAttention = "auto"

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``document_ids`` [B, T] keep packed documents apart (no cross-document attention,
        positions restart per document); ``attention_mask`` [B, S] marks real (1) vs pad (0)
        tokens over cache + new tokens, for left-padded batched generation."""
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if document_ids is not None:
                position_ids = positions_from_documents(document_ids)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past : past + t]
            else:
                position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        x = self.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = rope_cos_sin(position_ids, self.config.resolved_head_dim, self.config.rope_theta, x.dtype)
        mask = AttentionMask.build(
            batch=b,
            q_len=t,
            past=past,
            device=input_ids.device,
            document_ids=document_ids,
            attention_mask=attention_mask,
            doc_attention=self.doc_attention,
        )
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += t
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head; ``forward`` returns logits [B, T, V]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        head_fn: Callable[[torch.Tensor, nn.Linear], HeadOut] | None = None,
    ) -> torch.Tensor | HeadOut:
        """Logits [B, T, V]; with ``head_fn``, ``head_fn(hidden [B, T, H], lm_head)`` instead.

        ``head_fn`` lets a training objective apply the LM head itself (e.g. chunk by chunk, so the
        full [B, T, V] logits never exist) inside this forward, where FSDP has gathered the head.
        """
        hidden = self.model(
            input_ids,
            position_ids=position_ids,
            document_ids=document_ids,
            attention_mask=attention_mask,
            cache=cache,
        )
        if head_fn is not None:
            return head_fn(hidden, self.lm_head)
        return linear(self.lm_head, hidden)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """normal(0, std) everywhere; residual output projections scaled by 1/sqrt(2·layers)."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                s = out_std if name.endswith(("o_proj", "down_proj")) else std
                if module is self.lm_head and self.config.tie_word_embeddings:
                    continue
                module.weight.normal_(0.0, s, generator=generator)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def tie_weights(self) -> None:
        """Re-share the head with the embedding (needed after ``to_empty`` or ``load_state_dict(assign=True)``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


def build_model(
    config: ModelConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
    init: bool = True,
) -> LlamaForCausalLM:
    """Build on the meta device (no memory), then materialise on ``device`` and initialise.

    ``device="meta"`` returns the shape-only model: a 7B model can be inspected anywhere.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    if torch.device(device).type == "meta":
        return model
    if not init:
        model = model.to_empty(device=device)
        model.tie_weights()
        return model
    # Initialise on the CPU generator whatever the target device, so a seed gives the same weights on
    # CPU, on one GPU and under FSDP (where rank 0 initialises on CPU and broadcasts).
    model = model.to_empty(device="cpu")
    model.tie_weights()
    gen = None
    if seed is not None:
        gen = torch.Generator()
        gen.manual_seed(seed)
    model.init_weights(gen)
    if torch.device(device).type != "cpu":
        model = model.to(device)
        model.tie_weights()
    return model
