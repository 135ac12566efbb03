"""RL on a weighted mixture of prompt sources: the prompt order (shares, determinism, world-size independence,
exact resume, the single-source order unchanged), rewards routed by source, their metrics, config errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_pipeline.rewards import CombinedReward, RewardSpec
from llm_pipeline.train.rl import RLConfig
from llm_pipeline.train.rl_data import MixedRolloutSource, RolloutSource, Sampler

SIZES = {"math": 37, "chat": 11, "code": 5}


def _pools() -> dict[str, list[dict[str, Any]]]:
    return {n: [{"prompt_ids": [1, i], "id": f"{n}{i}"} for i in range(k)] for n, k in SIZES.items()}


def _source(shares: dict[str, float] | None = None, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "reward": CombinedReward([RewardSpec(name="format")]),
        "sampler": Sampler(stop_ids=[3], pad_id=0, decode=str),
        "prompts_per_rank": 4, "num_generations": 2, "num_iterations": 1, "advantage": "grpo",
        "filter_zero_std_groups": False, "beta": 0.0, "seed": 5,
        "generation": {"max_new_tokens": 2, "temperature": 1.0, "top_p": 1.0, "top_k": 0}, **kw,
    }  # fmt: skip
    return MixedRolloutSource(_pools(), shares=shares or {"math": 0.6, "chat": 0.3, "code": 0.1}, **args)


def _ids(src: Any, rollouts: int) -> list[str]:
    return [ex["id"] for _ in range(rollouts) for ex in src._next_examples()]


def test_realised_shares_follow_the_weights_and_each_source_walks_its_own_permutations() -> None:
    ids = _ids(_source(), 250)  # 1000 prompts: many passes over each source
    counts = Counter(i.rstrip("0123456789") for i in ids)
    assert {n: c / len(ids) for n, c in counts.items()} == pytest.approx({"math": 0.6, "chat": 0.3, "code": 0.1},
                                                                       abs=0.005)  # fmt: skip
    chat = [i for i in ids if i.startswith("chat")]
    for e in range(len(chat) // SIZES["chat"]):  # every pass over a source is a permutation of it
        assert sorted(chat[e * 11 : (e + 1) * 11]) == sorted(f"chat{i}" for i in range(11))
    assert chat[:11] != chat[11:22]  # a new order per pass
    assert _ids(_source(), 250) == ids  # deterministic for a seed
    assert _ids(_source(seed=6), 250) != ids
    assert all(ex["_source"] == n for n, pool in _source().pools.items() for ex in pool)  # the source's name


def test_two_ranks_take_the_slices_of_one_processs_prompts() -> None:
    one = _source(prompts_per_rank=4)
    ranks = [_source(prompts_per_rank=2, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(40):
        assert _ids(one, 1) == [i for s in ranks for i in _ids(s, 1)]


def test_state_round_trip_mid_run_continues_with_the_same_prompts() -> None:
    ref = _source()
    ref_ids = _ids(ref, 300)  # 1200 prompts: crosses blocks of the weighted order and passes of every source
    for cut in (1, 128, 129, 200):  # 129 x 4 = 516: just past a block boundary
        src = _source()
        _ids(src, cut)
        state = src.state_dict()
        resumed = _source()
        resumed.load_state_dict(state)
        assert _ids(resumed, 300 - cut) == ref_ids[cut * 4 :], cut
        assert resumed.counts() == src.counts()
    with pytest.raises(ValueError, match=r"checkpoint's RL prompt sources \(chat, code, math\) are not this run's"):
        RolloutSource([{"prompt_ids": [1]}], **{k: v for k, v in _source_kwargs().items()}).load_state_dict(state)


def _source_kwargs() -> dict[str, Any]:
    src = _source()
    return {"reward": src.reward, "sampler": src.sampler, "prompts_per_rank": 4, "num_generations": 2,
            "num_iterations": 1, "advantage": "grpo", "filter_zero_std_groups": False, "beta": 0.0, "seed": 5,
            "generation": src.generation}  # fmt: skip


def test_single_source_order_is_unchanged() -> None:
    """Without a mixture the prompts come in the order of the formula every earlier run used."""
    examples = [{"prompt_ids": [1, i], "id": i} for i in range(13)]
    src = RolloutSource(examples, **_source_kwargs())
    got = [ex["id"] for _ in range(10) for ex in src._next_examples()]
    want: list[int] = []
    for epoch in range(4):
        want += torch.randperm(13, generator=torch.Generator().manual_seed(5 * 1000 + epoch)).tolist()
    assert got == want[:40]
    state = src.state_dict()
    legacy = {**{k: v for k, v in state.items() if k != "sources"}, "epoch": 3, "cursor": 1}  # an older checkpoint
    again = RolloutSource(examples, **_source_kwargs())
    again.load_state_dict(legacy)
    assert [ex["id"] for ex in again._next_examples()] == want[40:44]


def test_reward_metrics_are_over_the_completions_each_reward_applies_to() -> None:
    specs = [RewardSpec(name="numeric_answer", sources=["math"]), RewardSpec(name="format", sources=["chat", "code"])]
    src = _source(reward=CombinedReward(specs))
    math, chat = {"_source": "math"}, {"_source": "chat"}
    sampled = [
        {"examples": [math, math], "completions": [[5, 3], [6, 3]], "rewards": [1.0, 0.0],
         "parts": {"numeric_answer": [1.0, 0.0], "format": [None, None]}},
        {"examples": [chat, chat], "completions": [[5, 3], [6]], "rewards": [1.0, 1.0],
         "parts": {"numeric_answer": [None, None], "format": [1.0, 1.0]}},
    ]  # fmt: skip
    m = src._rollout_metrics(sampled, 1, 0.0)
    assert m["rewards/numeric_answer/mean"] == 0.5 and m["rewards/format/mean"] == 1.0  # not diluted by Nones
    assert m["reward"] == 0.75 and m["mix/math/reward"] == 0.5 and m["mix/chat/reward"] == 1.0
    assert "mix/code/reward" not in m


def _config(tmp: Path, data: dict[str, Any], rewards: list[dict[str, Any]], **rl: Any) -> dict[str, Any]:
    return {"model": {"init_from": str(tmp)}, "data": data, "parallel": {"device": "cpu"},
            "rl": {"prompts_per_step": 2, "num_generations": 2, "rewards": rewards, "beta": 0.0, **rl},
            "training": {"max_steps": 1, "output_dir": str(tmp / "ckpt")}}  # fmt: skip


MIX = {"sources": [{"name": "arith", "kind": "arithmetic", "weight": 0.75},
                   {"name": "safe", "kind": "safety", "weight": 0.25}]}  # fmt: skip


@pytest.mark.parametrize(
    ("data", "rewards", "message"),
    [
        (MIX, [{"name": "numeric_answer", "sources": ["arith"]}, {"name": "refusal", "sources": ["safety"]}],
         r"rl.rewards\[1\] \(refusal\): sources 'safety' not in data.sources \(have: arith, safe\)"),
        ({"kind": "arithmetic"}, [{"name": "numeric_answer", "sources": ["arith"]}],
         r"rl.rewards\[0\] \(numeric_answer\) sets sources \['arith'\], but data.sources is empty"),
        (MIX, [{"name": "numeric_answer", "sources": ["arith"]}],
         r"data.sources 'safe': no reward in rl.rewards scores its prompts, and rl.beta is 0: .* KL anchor"),
        ({**MIX, "sources": [*MIX["sources"], {"name": "x", "kind": "local", "weight": 1}]},
         [{"name": "refusal"}], r"data.sources\[2\] \('x'\): .*data.kind=local needs data.paths"),
        ({**MIX, "sources": [*MIX["sources"], {"name": "y", "kind": "nope", "weight": 1}]},
         [{"name": "refusal"}], r"data.sources\[2\] \('y'\): kind: .*unknown RL data kind 'nope'"),
    ],
)  # fmt: skip
def test_routing_config_errors_name_the_source(tmp_path: Path, data: dict, rewards: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RLConfig.model_validate(_config(tmp_path, data, rewards))


def test_a_mixed_config_validates(tmp_path: Path) -> None:
    rewards = [{"name": "numeric_answer", "sources": ["arith"]}, {"name": "refusal", "sources": ["safe"]}]
    cfg = RLConfig.model_validate(_config(tmp_path, MIX, rewards))
    readers = cfg.data.readers()
    assert readers["arith"].kind == "arithmetic" and readers["safe"].kind == "safety"


def test_max_epochs_caps_the_passes_over_a_source() -> None:
    from llm_pipeline.data.mixture_config import MixtureSource
    from llm_pipeline.train.rl_data import check_prompt_passes

    entries = {"a": MixtureSource(name="a", weight=0.5, max_epochs=2), "b": MixtureSource(name="b", weight=0.5)}
    shares, sizes = {"a": 0.5, "b": 0.5}, {"a": 100, "b": 10}
    assert check_prompt_passes(entries, shares, sizes, 400) == {"a": 2.0, "b": 20.0}
    with pytest.raises(ValueError, match=r"data source 'a': .* 100 prompts 2.10 times, more than its max_epochs 2"):
        check_prompt_passes(entries, shares, sizes, 420)


def test_a_source_no_reward_scores_is_a_kl_anchor_only_with_a_kl_term(tmp_path: Path) -> None:
    rewards = [{"name": "numeric_answer", "sources": ["arith"]}]
    cfg = RLConfig.model_validate(_config(tmp_path, MIX, rewards, beta=0.2))
    assert cfg.anchor_sources == ["safe"]
    with pytest.raises(ValueError, match=r"'safe': .* rl.filter_zero_std_groups drops its groups"):
        RLConfig.model_validate(_config(tmp_path, MIX, rewards, variant="dapo", beta=0.2))
