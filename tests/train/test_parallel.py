"""Activation checkpointing, compile and float8 as far as a CPU allows; FP8 flag resolution."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm_pipeline.checkpoint import dcp
from llm_pipeline.checkpoint.dcp import full_model_state_dict
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.train import parallel
from llm_pipeline.train.objectives import CausalLMObjective
from llm_pipeline.train.parallel import (
    apply_activation_checkpointing,
    apply_compile,
    apply_float8,
    fp8_supported,
    resolve_fp8,
)


def _batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _grads(model, batch):
    model.zero_grad()
    out = CausalLMObjective(z_loss_weight=1e-4)(model, batch)
    out.loss_sum.backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_gradients(mode):
    cfg = get_preset("debug")
    batch = _batch(cfg)
    ref_loss, ref = _grads(build_model(cfg, seed=0), batch)
    model = build_model(cfg, seed=0)
    apply_activation_checkpointing(model, mode)
    loss, grads = _grads(model, batch)
    assert torch.equal(loss, ref_loss)
    # wrapper names are stripped from the checkpointable state dict
    assert set(full_model_state_dict(model)) == set(build_model(cfg, device="meta").state_dict())
    clean = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in grads.items()}
    for n, g in ref.items():
        torch.testing.assert_close(clean[n], g, rtol=1e-5, atol=1e-7)


def test_fp8_flag_resolution_on_cpu():
    assert fp8_supported(torch.device("cpu"))[0] is False
    assert resolve_fp8(None, torch.device("cpu")) is False
    assert resolve_fp8(False, torch.device("cpu")) is False
    with pytest.raises(ValueError, match="--no-fp8"):
        resolve_fp8(True, torch.device("cpu"))


def test_float8_conversion_runs_on_cpu():
    """torchao swaps every block linear (not the head) and trains through them on CPU."""
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    cfg = get_preset("debug")
    batch = _batch(cfg)
    ref_loss, _ = _grads(build_model(cfg, seed=0), batch)
    model = build_model(cfg, seed=0)
    n = apply_float8(model)
    assert n == 7 * cfg.num_hidden_layers
    assert not isinstance(model.lm_head, Float8Linear)
    loss, grads = _grads(model, batch)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 0.02  # fp8 rounding, same function
    assert set(full_model_state_dict(model)) == set(build_model(cfg, device="meta").state_dict())


def test_a_stage_filter_keeps_modules_out_of_float8():
    """A stage's transform can keep its own modules (e.g. adapters) in high precision."""
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    cfg = get_preset("debug")
    model = build_model(cfg, seed=0)
    n = apply_float8(model, module_filter=lambda m, fqn: ".mlp." not in fqn)
    assert n == 4 * cfg.num_hidden_layers  # q, k, v, o converted; gate, up, down kept
    assert not isinstance(model.model.layers[0].mlp.up_proj, Float8Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Float8Linear)


@pytest.mark.gpu
def test_float8_on_gpu_matches_bf16():
    cfg = get_preset("debug", hidden_size=128, intermediate_size=384)
    batch = {k: v.cuda() for k, v in _batch(cfg).items()}
    ref = build_model(cfg, device="cuda", seed=0)
    model = build_model(cfg, device="cuda", seed=0)
    apply_float8(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, _ = _grads(ref, batch)
        b, _ = _grads(model, batch)
    assert abs(a.item() - b.item()) / a.item() < 0.02


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    """Per-block torch.compile keeps names and numerics (one compile of the debug block on CPU)."""
    cfg = get_preset("debug", num_hidden_layers=1)
    batch = _batch(cfg)
    ref_loss, ref = _grads(build_model(cfg, seed=0), batch)
    model = build_model(cfg, seed=0)
    apply_compile(model)
    loss, grads = _grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    assert set(grads) == set(ref)
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-3, atol=1e-5)


def test_collectives_are_one_set_and_no_ops_alone():
    """Checkpoints and training share one set of collectives; one process needs no process group."""
    assert (dcp._dist, dcp._rank, dcp._world) == (parallel.is_distributed, parallel.rank, parallel.world_size)
    assert (dcp._barrier, dcp._all_sum, dcp._any_rank) == (parallel.barrier, parallel.sum_over_ranks, parallel.any_rank)
    assert not parallel.is_distributed()
    assert (parallel.rank(), parallel.world_size()) == (0, 1)
    assert parallel.sum_over_ranks(2.5) == 2.5
    assert parallel.any_rank(True) and not parallel.any_rank(False, torch.device("cpu"))
    t = torch.tensor([1.0, 2.0])
    assert parallel.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    parallel.barrier()
    assert parallel.collective_device() == torch.device("cpu")


def _collectives_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = {
            "rank": parallel.rank(),
            "world": parallel.world_size(),
            "sum": parallel.sum_over_ranks(float(rank + 1) + 2**40),  # float64: exact beyond float32
            "tensor": parallel.all_reduce_sum(torch.tensor([float(rank), 1.0])).tolist(),
            "any_one": parallel.any_rank(rank == 1),
            "any_none": parallel.any_rank(False, torch.device("cpu")),
        }
        parallel.barrier()
        torch.save(result, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_collectives_on_two_ranks(tmp_path):
    """Two gloo processes: sums, the any-rank vote and rank/world answers agree on both."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_collectives_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        got = torch.load(tmp_path / f"{r}.pt")
        assert got == {
            "rank": r,
            "world": 2,
            "sum": 3.0 + 2 * 2**40,
            "tensor": [1.0, 2.0],
            "any_one": True,
            "any_none": False,
        }
