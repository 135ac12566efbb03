"""RL sampling: the generator follows the model's device, rows draw world-size-independent numbers, ranks
decode in lockstep under FSDP until every rank is done, log-probs use the sampling temperature, and the
arithmetic held-out split keeps each problem with its commuted twin."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm_pipeline.model.generate import generate, sample_next
from llm_pipeline.model.llama import build_model
from llm_pipeline.model.presets import get_preset


def _tiny(vocab: int = 64) -> torch.nn.Module:
    cfg = get_preset("tiny", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return build_model(cfg, seed=0)


def _rollout_source(**kw: object) -> object:
    from llm_pipeline.rewards import CombinedReward, RewardSpec
    from llm_pipeline.train.rl_data import RolloutSource, Sampler

    examples = [{"prompt_ids": [1, 2 + i], "answer": str(i)} for i in range(12)]
    sampler = Sampler(stop_ids=[3], pad_id=0, decode=lambda ids: " ".join(map(str, ids)))
    args = {"reward": CombinedReward([RewardSpec(name="numeric_answer")]), "sampler": sampler,
            "prompts_per_rank": 2, "num_generations": 2, "num_iterations": 1, "advantage": "grpo",
            "filter_zero_std_groups": False, "beta": 0.0, "seed": 3,
            "generation": {"max_new_tokens": 5, "temperature": 1.0, "top_p": 1.0, "top_k": 0}, **kw}  # fmt: skip
    return RolloutSource(examples, **args)  # type: ignore[arg-type]


def test_rl_stage_puts_the_sampling_generator_on_the_models_device() -> None:
    """prepare() rebuilds the generator where the policy lives (CUDA sampling refuses a CPU generator)."""
    from llm_pipeline.train.rl_data import sampling_generator

    src = _rollout_source()
    model = _tiny()
    src.use_device(next(model.parameters()).device)  # type: ignore[attr-defined]
    assert src.generator.device == next(model.parameters()).device  # type: ignore[attr-defined]
    assert torch.equal(src.generator.get_state(), sampling_generator(3, torch.device("cpu")).get_state())  # type: ignore[attr-defined]


@pytest.mark.gpu
def test_rollout_on_cuda_with_temperature() -> None:
    src = _rollout_source()
    model = _tiny().cuda()
    src.model = model  # type: ignore[attr-defined]
    src.use_device(torch.device("cuda"))  # type: ignore[attr-defined]
    assert src.generator.device.type == "cuda"  # type: ignore[attr-defined]
    batch = src.next_batch()  # type: ignore[attr-defined]
    assert batch["input_ids"].shape[0] == 4


def test_uniforms_make_each_rows_sample_independent_of_the_batch() -> None:
    """Inverse-CDF picks: a row's token depends on its logits and its own number only, and follows the
    distribution (zero-probability tokens are never picked)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[:, 7] = float("-inf")
    u = torch.rand(6)
    full = sample_next(logits, temperature=0.8, top_k=10, uniforms=u)
    halves = torch.cat(
        [sample_next(logits[i : i + 3], temperature=0.8, top_k=10, uniforms=u[i : i + 3]) for i in (0, 3)]
    )
    assert torch.equal(full, halves)
    draws = sample_next(logits[:1].expand(20000, -1), temperature=1.0, uniforms=torch.rand(20000))
    freq = torch.bincount(draws, minlength=50).float() / 20000
    assert freq[7] == 0
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)


def test_rollouts_on_two_ranks_are_the_slices_of_one_processs() -> None:
    """Rank r samples the r-th slice of one global prompt order and one block of sampling numbers."""
    model = _tiny()
    one = _rollout_source(prompts_per_rank=4)
    one.model = model  # type: ignore[attr-defined]
    ranks = [_rollout_source(rank=r, world_size=2) for r in (0, 1)]
    for s in ranks:
        s.model = model  # type: ignore[attr-defined]
    for _ in range(2):
        ref = one.next_batch()  # type: ignore[attr-defined]
        parts = [s.next_batch() for s in ranks]  # type: ignore[attr-defined]
        rows = [r[r != 0].tolist() for r in ref["input_ids"]]
        assert rows == [r[r != 0].tolist() for p in parts for r in p["input_ids"]]


def test_generate_keeps_stepping_while_the_vote_says_so() -> None:
    """keep_stepping(still_running) overrides the local stop: the forwards go on, finished rows get nothing."""
    model = _tiny()
    votes: list[bool] = []

    def keep(running: bool) -> bool:
        votes.append(running)
        return len(votes) < 4

    out = generate(model, [[1, 2]], max_new_tokens=8, eos_token_ids=list(range(64)), keep_stepping=keep)
    assert len(out[0]) == 1 and votes == [False] * 4


def _lockstep_worker(rank: int, init_file: str, out: str) -> None:
    from llm_pipeline.train.parallel import any_rank, apply_fsdp

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    try:
        model = _tiny()
        apply_fsdp(model, precision="fp32", reshard_after_forward=True, device=torch.device("cpu"))
        eos = list(range(64)) if rank == 0 else []  # rank 0's rows end at the first token, rank 1's run on
        got = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=6, eos_token_ids=eos, keep_stepping=any_rank)
        dist.barrier()
        torch.save([len(o) for o in got], Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_ranks_that_stop_at_different_steps_do_not_hang(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_lockstep_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert torch.load(tmp_path / "0.pt") == [1, 1]
    assert torch.load(tmp_path / "1.pt") == [6, 6]


def test_logps_use_the_sampling_temperature() -> None:
    """As TRL: log p is the log-softmax of logits / T, the distribution the rollouts were drawn from."""
    from llm_pipeline.train.rl_loss import completion_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=False)
    hidden = torch.randn(2, 5, 8)
    labels = torch.randint(0, 20, (2, 5))
    labels[0, :2] = -100
    logp, _ = completion_logps(head, hidden, labels, temperature=0.7)
    ref = torch.log_softmax(head(hidden) / 0.7, -1).gather(2, labels.clamp_min(0)[..., None])[..., 0]
    ref = ref.masked_fill(labels == -100, 0.0)
    assert torch.allclose(logp, ref, atol=1e-5)


def test_arithmetic_held_out_problems_have_no_commuted_twin_in_training() -> None:
    from llm_pipeline.data import arithmetic

    val = set(arithmetic.problems("val"))
    train = set(arithmetic.problems("train"))
    assert not {(b, a) for a, b in val} & train
    assert len(val) > 900  # the accuracy's standard error stays <= 0.017
