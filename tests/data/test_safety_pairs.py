"""The embedded safety preference pairs: what DPO needs to raise refusals without raising over-refusal."""

from __future__ import annotations

from llm_pipeline.data.safety_pairs import (
    SOURCE_NAME,
    safety_preference_pairs,
    safety_preference_records,
    safety_sft_records,
)
from llm_pipeline.eval.safety import RuleRefusalClassifier, _default_file, load_prompts


def test_pairs_teach_refusing_harm_and_answering_look_alikes_and_never_copy_the_eval() -> None:
    pairs = safety_preference_pairs()
    refused = RuleRefusalClassifier()
    harmful = [p for p in pairs if p["kind"] == "harmful"]
    benign = [p for p in pairs if p["kind"] == "benign"]
    assert len(harmful) > 100 and len(benign) > 50
    # the safety eval's own classifier reads the chosen replies as intended
    assert all(refused(p["prompt"], p["chosen"]) and not refused(p["prompt"], p["rejected"]) for p in harmful)
    assert all(not refused(p["prompt"], p["chosen"]) and refused(p["prompt"], p["rejected"]) for p in benign)
    # no pair is one of the eval's prompts: the eval measures new wordings
    eval_prompts = {
        *load_prompts(_default_file("safety_harmful.jsonl")),
        *load_prompts(_default_file("safety_benign.jsonl")),
    }
    assert not eval_prompts & {p["prompt"] for p in pairs}
    splits = {p["split"] for p in pairs}
    assert splits == {"train", "val"} and pairs == safety_preference_pairs()  # deterministic
    items = list(safety_preference_records())
    assert len(items) == len(pairs) and items[0].doc_id.startswith(SOURCE_NAME)
    assert set(items[0].record) == {"prompt", "chosen", "rejected"} and items[0].meta["split"] in splits
    sft = list(safety_sft_records())
    assert len(sft) == len(pairs) and sft[0].record["messages"][1]["content"] == pairs[0]["chosen"]
