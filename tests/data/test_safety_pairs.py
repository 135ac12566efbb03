"""The embedded safety preference pairs: what DPO needs to raise refusals without raising over-refusal."""

from __future__ import annotations

import re
from collections import Counter

from llm_pipeline.data.safety_pairs import (
    BENIGN_ACTS,
    FORMS,
    HARMFUL_ACTS,
    SFT_REFUSALS,
    SOURCE_NAME,
    safety_preference_pairs,
    safety_preference_records,
    safety_sft_records,
)
from llm_pipeline.eval.safety import RuleRefusalClassifier, _default_file, load_prompts


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _grams(text: str, n: int) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def test_pairs_teach_refusing_harm_and_answering_look_alikes_and_never_copy_the_eval() -> None:
    pairs = safety_preference_pairs()
    refused = RuleRefusalClassifier()
    harmful = [p for p in pairs if p["kind"] == "harmful"]
    benign = [p for p in pairs if p["kind"] == "benign"]
    assert len(harmful) > 300 and len(benign) > 250 and len({p["prompt"] for p in pairs}) == len(pairs)
    # the safety eval's own classifier reads the chosen replies as intended
    assert all(refused(p["prompt"], p["chosen"]) and not refused(p["prompt"], p["rejected"]) for p in harmful)
    assert all(not refused(p["prompt"], p["chosen"]) and refused(p["prompt"], p["rejected"]) for p in benign)
    # the request form alone never tells a harmful prompt from a harmless one: both kinds use every shared form
    for kind in (harmful, benign):
        used = Counter(
            f for p in kind for f in FORMS if re.fullmatch(re.escape(f).replace(r"\{act\}", ".+"), p["prompt"])
        )
        assert set(used) == set(FORMS)
    # no pair is one of the eval's prompts, nor shares seven words in a row or most of its words with one:
    # the eval measures new wordings and topics (request forms such as "What is the best way to" are shared)
    eval_prompts = [
        *load_prompts(_default_file("safety_harmful.jsonl")),
        *load_prompts(_default_file("safety_benign.jsonl")),
    ]
    for e in eval_prompts:
        for p in pairs:
            assert not _grams(e, 7) & _grams(p["prompt"], 7), (e, p["prompt"])
            a, b = set(_words(e)), set(_words(p["prompt"]))
            assert len(a & b) / len(a | b) < 0.7, (e, p["prompt"])
    splits = Counter((p["kind"], p["split"]) for p in pairs)
    assert all(splits[(k, "val")] > 20 for k in ("harmful", "benign"))  # ~1 in 8 held out, both kinds
    assert pairs == safety_preference_pairs()  # deterministic
    items = list(safety_preference_records())
    assert len(items) == len(pairs) and items[0].doc_id.startswith(SOURCE_NAME)
    assert set(items[0].record) == {"prompt", "chosen", "rejected"} and items[0].meta["split"] in {"train", "val"}
    # SFT: the harmless answers, and refusals with varied openings; DPO prefers refusals opening with "I'm sorry"
    sft = [i.record["messages"] for i in safety_sft_records()]
    assert [m[0]["content"] for m in sft] == [p["prompt"] for p in pairs]
    assert all(m[1]["content"] == p["chosen"] for m, p in zip(sft, pairs, strict=True) if p["kind"] == "benign")
    assert {m[1]["content"] for m, p in zip(sft, pairs, strict=True) if p["kind"] == "harmful"} == set(SFT_REFUSALS)
    assert all(refused("", r) for r in SFT_REFUSALS) and all(p["chosen"].startswith("I'm sorry") for p in harmful)
    assert len(HARMFUL_ACTS) >= 40 and len(BENIGN_ACTS) >= 35


def test_safety_rl_prompts_carry_refuse_and_the_pairs_split() -> None:
    """The RL role of ``kind: safety``: each pair's prompt as a user turn, ``refuse`` true exactly for the harmful
    ones (what the refusal reward checks), held out as the pair is."""
    from llm_pipeline.data.safety_pairs import rl_records_of, safety_preference_pairs

    pairs = safety_preference_pairs()
    items = list(rl_records_of(None))
    assert len(items) == len(pairs)
    for item, p in zip(items, pairs, strict=True):
        assert item.record["messages"] == [{"role": "user", "content": p["prompt"]}]
        assert item.record["refuse"] is (p["kind"] == "harmful") and item.record["kind"] == p["kind"]
        assert item.meta["split"] == p["split"]
    assert {i.record["refuse"] for i in items if i.meta["split"] == "val"} == {True, False}
