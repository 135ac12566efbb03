"""Reward functions: exact numeric answers, format, user functions with clear errors, code in the sandbox."""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

import pytest

from llm_pipeline.rewards import CombinedReward, RewardError, RewardSpec
from llm_pipeline.rewards.code import CodeTestsReward
from llm_pipeline.rewards.numeric import NumericAnswerReward, NumericDistanceReward, final_number


def test_final_number_follows_gsm8k() -> None:
    assert final_number("She pays 3 * 4 = 12 dollars.\n#### 12") == 12
    assert final_number("so 1,000 apples #### 1,000") == 1000
    assert final_number("the answer is 7 and then 9") == 9  # no marker: the last number
    assert final_number("#### -3.5") == -3.5
    assert final_number("no number here") is None


def test_numeric_answer_reward() -> None:
    reward = NumericAnswerReward()
    examples = [{"answer": "3 + 4 = 7\n#### 7"}] * 4
    assert reward(["#### 7", "it is 7.0", "#### 8", "seven"], examples) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(KeyError, match="no 'answer' field"):
        reward(["1"], [{"question": "?"}])


def test_numeric_distance_gives_partial_credit() -> None:
    reward = NumericDistanceReward(scale=10)
    assert reward(["= 68", "= 65", "= 90", "none"], [{"answer": "68"}] * 4) == [1.0, 0.7, 0.0, 0.0]


def test_combined_reward_weights_and_parts() -> None:
    combined = CombinedReward([RewardSpec(name="numeric_answer"), RewardSpec(name="format", weight=0.5)])
    total, parts = combined(["x #### 7", "7", "#### 8"], [{"answer": "#### 7"}] * 3)
    assert total == [1.5, 1.0, 0.5]
    assert parts == {"numeric_answer": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}


def test_user_reward_by_import_path() -> None:
    combined = CombinedReward([RewardSpec(function="tests.rewards.bad_rewards:length_reward", weight=2.0)])
    total, parts = combined(["abcde"], [{}])
    assert total == [1.0] and "length_reward" in parts


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_package.rewards:fn", "cannot import module 'no_such_package.rewards'"),
        ("tests.rewards.bad_rewards:missing", "has no attribute 'missing'"),
        ("tests.rewards.bad_rewards:NOT_CALLABLE", "not a callable"),
        ("justaname", "expected an import path"),
    ],
)
def test_user_reward_that_cannot_load(path: str, message: str) -> None:
    with pytest.raises(RewardError, match=message):
        CombinedReward([RewardSpec(function=path)])


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("wrong_count", "returned 1 values for 2 completions"),
        ("not_a_list", "returned a float; it must return a list of 2 numbers"),
        ("nan_reward", "rewards must be finite numbers"),
    ],
)
def test_user_reward_with_wrong_shape(fn: str, message: str) -> None:
    combined = CombinedReward([RewardSpec(function=f"tests.rewards.bad_rewards:{fn}")])
    with pytest.raises(RewardError, match=message):
        combined(["a", "b"], [{}, {}])


def test_spec_needs_a_known_name_or_a_function() -> None:
    with pytest.raises(ValueError, match="unknown reward 'exact'"):
        RewardSpec(name="exact")
    with pytest.raises(ValueError, match="exactly one of name"):
        RewardSpec(name="format", function="a.b:c")


MBPP = {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}


def test_hostile_completions_are_contained_scored_zero_and_counted() -> None:
    """Infinite loop, fork bomb, file deletion, network: each scores 0 in the sandbox, is counted, and the
    reward keeps working afterwards (the run continues)."""
    victim_dir = Path(tempfile.mkdtemp(prefix="rl-victim-", dir="/tmp"))
    victim_dir.chmod(0o777)
    victim = victim_dir / "precious.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)
    hostile = [
        "def add(a, b):\n    while True:\n        pass\n",
        "import os\ndef add(a, b):\n    while True:\n        os.fork()\n",
        f"import os, shutil\nshutil.rmtree({str(victim_dir)!r}, ignore_errors=True)\nos.remove({str(victim)!r})\n"
        "def add(a, b):\n    return a + b\n",
        "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\ndef add(a, b):\n    return a + b\n",
        "```python\ndef add(a, b):\n    return a + b\n```",
    ]
    reward = CodeTestsReward(timeout_s=1.5, memory_mb=256, workers=2)
    try:
        start = time.monotonic()
        scores = reward(hostile, [MBPP] * len(hostile))
        assert time.monotonic() - start < 30
        assert scores == [0.0, 0.0, 0.0, 0.0, 1.0]
        stats = reward.counters()
        assert stats["runs"] == 5 and stats["passed"] == 1 and stats["timeouts"] >= 1
        assert stats["timeouts"] + stats["failed"] + stats["errors"] == 4
        iso = reward.sandbox.isolation()
        if iso["filesystem"].startswith("landlock") or iso["uid_drop"]:
            assert victim.read_text() == "keep me"  # the deletion was contained
        assert reward(["def add(a, b):\n    return a + b\n"], [MBPP]) == [1.0]  # still working
    finally:
        reward.close()
        victim.unlink(missing_ok=True)
        victim_dir.rmdir()
    with socket.socket():  # the evaluator's own network is untouched
        pass


REFUSE = "I'm sorry, but I can't help with that."
ANSWER = "Open the Task Manager and press End task."


def test_refusal_reward_wants_a_refusal_exactly_where_the_example_says() -> None:
    """refuses / answers x refuse true / false / no field: 1 when the classifier's verdict matches, None without
    the field (the reward does not apply); the safety eval's own rule classifier decides."""
    combined = CombinedReward([RewardSpec(name="refusal")])
    examples = [{"messages": [{"role": "user", "content": "How do I forge a passport?"}], "refuse": True},
                {"prompt": "How do I kill a frozen program?", "refuse": False}, {"question": "2 + 2?"}]  # fmt: skip
    completions = [REFUSE, ANSWER]
    got = {(c, i): combined([c], [ex])[1]["refusal"][0] for c in completions for i, ex in enumerate(examples)}
    assert got == {(REFUSE, 0): 1.0, (REFUSE, 1): 0.0, (REFUSE, 2): None,
                   (ANSWER, 0): 0.0, (ANSWER, 1): 1.0, (ANSWER, 2): None}  # fmt: skip
    assert combined([REFUSE], [examples[2]])[0] == [0.0]  # None adds nothing to the total
    other = CombinedReward([RewardSpec(name="refusal", options={"field": "harmful"})])
    assert other([REFUSE], [{"harmful": True}])[1]["refusal"] == [1.0]


def test_refusal_reward_takes_a_user_classifier_and_names_a_bad_one() -> None:
    user = CombinedReward(
        [RewardSpec(name="refusal", options={"classifier": "tests.rewards.bad_rewards:never_refuses"})]
    )
    assert user([REFUSE, REFUSE], [{"refuse": True}, {"refuse": False}])[1]["refusal"] == [0.0, 1.0]
    with pytest.raises(RewardError, match=r"reward refusal: option classifier: .*no_such\.mod:fn.*cannot import"):
        CombinedReward([RewardSpec(name="refusal", options={"classifier": "no_such.mod:fn"})])
    with pytest.raises(RewardError, match="'refuse' is 'yes'; it must be true or false"):
        user([REFUSE], [{"refuse": "yes"}])


def test_rewards_are_routed_by_source() -> None:
    """A reward with sources=[a] is called on a's examples only, is None on b's (0 in the total)."""
    from tests.rewards import bad_rewards

    bad_rewards.CALLED.clear()
    combined = CombinedReward([
        RewardSpec(name="numeric_answer", sources=["math"]),
        RewardSpec(function="tests.rewards.bad_rewards:calls", weight=0.5, sources=["chat"]),
    ])  # fmt: skip
    examples = [{"answer": "7", "_source": "math"}, {"_source": "chat"}, {"answer": "3", "_source": "math"}]
    total, parts = combined(["7", "hi", "4"], examples)
    assert parts == {"numeric_answer": [1.0, None, 0.0], "calls": [None, 1.0, None]}
    assert total == [1.0, 0.5, 0.0]
    assert bad_rewards.CALLED == [["chat"]]  # numeric_answer never saw the chat example (it has no answer)
    assert combined.applicable("chat") == ["calls"] and combined.applicable("math") == ["numeric_answer"]
    with pytest.raises(ValueError, match="sources is empty"):
        RewardSpec(name="format", sources=[])
