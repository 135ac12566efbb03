"""Architecture behaviour that matters: document masking, KV cache, meta init, accounting."""

from __future__ import annotations

import math

import pytest
import torch

from llm_pipeline.model import KVCache, build_model, get_preset
from llm_pipeline.model.flops import count_parameters, estimate_training_memory, flops_per_token
from llm_pipeline.model.generate import sample_next
from llm_pipeline.model.llama import AttentionMask, positions_from_documents


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("debug"), seed=0).eval()


def _docs_row(lengths: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (1, sum(lengths)))
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    return ids, doc


@pytest.mark.parametrize("impl", ["dense", "segments", "flex"])
def test_packed_row_equals_documents_run_alone(model, impl):
    lengths = [5, 11, 1, 16]
    ids, doc = _docs_row(lengths, model.config.vocab_size)
    model.model.doc_attention = impl
    try:
        with torch.no_grad():
            packed = model(ids, document_ids=doc)
            alone = torch.cat([model(chunk) for chunk in ids.split(lengths, dim=1)], dim=1)
    finally:
        model.model.doc_attention = "auto"
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_grouped_document_attention_gradients_equal_the_dense_mask():
    """Several rows with documents of many lengths (grouped by width), tail padding and a row of padding
    only: logits of real tokens and every parameter gradient equal the dense-mask computation."""
    model = build_model(get_preset("debug"), seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 150), generator=gen)
    docs = torch.full((3, 150), -1)
    docs[0, :3], docs[0, 3:70], docs[0, 70:71], docs[0, 71:140] = 0, 1, 2, 3  # then 10 padding tokens
    docs[1] = 7  # one document filling the row
    results = {}
    for impl in ("dense", "segments"):
        model.zero_grad(set_to_none=True)
        model.model.doc_attention = impl
        logits = model(ids, document_ids=docs)
        (logits.float().square() * (docs >= 0)[..., None]).mean().backward()
        results[impl] = (logits.detach()[docs >= 0], {n: p.grad.clone() for n, p in model.named_parameters()})
    model.model.doc_attention = "auto"
    torch.testing.assert_close(results["segments"][0], results["dense"][0], atol=1e-5, rtol=0)
    for name, grad in results["dense"][1].items():
        torch.testing.assert_close(results["segments"][1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_positions_restart_per_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_from_documents(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


def test_kv_cache_decoding_matches_full_forward(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 12, ids.device, torch.float32)
        first = model(ids[:, :7], cache=cache)
        rest = [model(ids[:, i : i + 1], cache=cache) for i in range(7, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_overflow_is_an_error(model):
    cache = KVCache(model.config, 1, 4, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_meta_build_allocates_nothing_and_counts_7b():
    cfg = get_preset("7b")
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg) == 7_391_678_464


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_real_model(tied):
    cfg = get_preset("debug", tie_word_embeddings=tied)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_init_statistics():
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=0)
    std_out = cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers)
    assert model.model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(std_out, rel=0.05)
    assert torch.equal(model.model.norm.weight, torch.ones(cfg.hidden_size))
    again = build_model(cfg, seed=0)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)


def test_flops_per_token_follows_torchtitan_convention():
    cfg = get_preset("7b")
    norms = (2 * 32 + 1) * 4096  # elementwise weights: not matmuls (torchtitan counts them, 0.004% more)
    n_matmul = count_parameters(cfg) - cfg.vocab_size * cfg.hidden_size - norms
    expected = 6 * n_matmul + 12 * 32 * 32 * 128 * 2048
    assert flops_per_token(cfg, 2048) == expected


def test_memory_estimate_says_7b_adamw_does_not_fit_one_gpu():
    cfg = get_preset("7b")
    one = estimate_training_memory(cfg, num_gpus=1, micro_batch_size=1, seq_len=4096)
    eight = estimate_training_memory(cfg, num_gpus=8, micro_batch_size=1, seq_len=4096, activation_checkpointing="full")
    assert not one.fits and one.weights + one.gradients + one.optimizer > 80 * 1024**3
    assert eight.fits and eight.total < one.total
    with pytest.raises(ValueError):
        estimate_training_memory(cfg, num_gpus=0)


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    picked = sample_next(logits, temperature=1.0, top_k=2, generator=gen)
    assert set(picked.tolist()) == {1, 2}
    picked = sample_next(logits, temperature=1.0, top_p=0.3, generator=gen)
    assert set(picked.tolist()) == {1}
    assert sample_next(logits[:1]).item() == 1


def test_bf16_matmuls_in_fp32_keep_autocasts_numerics(monkeypatch):
    """On CPUs without a fast bf16 kernel the model's linears run bf16 autocast as fp32 matmuls of the
    bf16-rounded operands (model/kernels.py): bf16 results, and loss and gradients as close to fp32
    as PyTorch's own bf16 kernel gets (only the summation order differs)."""
    from llm_pipeline.model import kernels

    model = build_model(get_preset("debug"), seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))

    def step(emulate: bool | None) -> tuple[float, list[torch.Tensor]]:
        monkeypatch.setattr(kernels, "NATIVE_CPU_BF16_MATMUL", not emulate)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=emulate is not None):
            logits = model(ids)
            assert logits.dtype == (torch.float32 if emulate is None else torch.bfloat16)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = step(None)  # fp32
    errors = {}
    for emulate in (False, True):
        loss, grads = step(emulate)
        assert abs(loss - ref_loss) < 1e-2 * ref_loss
        errors[emulate] = max(float((g - r).norm() / r.norm()) for g, r in zip(grads, ref_grads, strict=True))
    assert errors[True] < 0.05 and errors[True] <= 1.5 * errors[False], errors
    # Only plain bias-free nn.Linear layers take the fp32 route: any other module is called as it is.
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = kernels.linear(torch.nn.Linear(8, 4, bias=False), x)
        plain = kernels.linear(torch.nn.Linear(8, 4, bias=True), x)
    assert routed.dtype == plain.dtype == torch.bfloat16
    assert routed.grad_fn.name() == "_Bf16LinearInFp32Backward" and plain.grad_fn.name() != routed.grad_fn.name()


def test_decode_step_mask_equals_the_general_padded_causal_mask() -> None:
    """The one-token fast path builds exactly the mask the general case builds (pads hidden, self kept)."""
    am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    fast = AttentionMask.build(
        batch=3, q_len=1, past=5, device=am.device, document_ids=None, attention_mask=am, doc_attention="auto"
    ).dense
    q_pos, k_pos = torch.arange(5, 6), torch.arange(6)
    general = (k_pos[None] <= q_pos[:, None])[None, None] & am[:, None, None, :].bool()
    general = general | (k_pos[None] == q_pos[:, None])[None, None]
    assert fast.shape == (3, 1, 1, 6) and torch.equal(fast, general)
    assert am[2].sum() == 0  # the caller's mask is not written
