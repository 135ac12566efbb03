"""Preference (DPO) data: layouts, rejects, truncation, batches and stable pair ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_pipeline.data.chat import RecordError
from llm_pipeline.data.config import PreferenceDataConfig
from llm_pipeline.data.preference import PreferenceBatchSource, build_preference_sources, parse_preference
from llm_pipeline.data.tokenizer import load_tokenizer

from .corpus import write_jsonl

IGNORE = -100


def _m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": [_m("user", "q")], "chosen": [_m("assistant", "good")], "rejected": [_m("assistant", "bad")]},
        {  # HuggingFaceH4/ultrafeedback_binarized: whole conversations sharing the prompt turns
            "prompt": "q",
            "prompt_id": "p1",
            "chosen": [_m("user", "q"), _m("assistant", "good")],
            "rejected": [_m("user", "q"), _m("assistant", "bad")],
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        },
    ],
    ids=["strings", "trl-conversational", "ultrafeedback"],
)
def test_layouts(record):
    assert parse_preference(record) == ([_m("user", "q")], _m("assistant", "good"), _m("assistant", "bad"))


def test_multi_turn_prompt_system_column_and_renames():
    turns = [_m("user", "q1"), _m("assistant", "a1"), _m("user", "q2")]
    record = {"sys": "be kind", "c": [*turns, _m("assistant", "good")], "r": [*turns, _m("assistant", "bad")]}
    prompt, chosen, rejected = parse_preference(record, {"chosen": "c", "rejected": "r", "system": "sys"})
    assert prompt == [_m("system", "be kind"), *turns] and chosen["content"] == "good" and rejected["content"] == "bad"


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ("not an object", "malformed_record"),
        ({"prompt": "q", "chosen": "a"}, "missing_field"),
        ({"chosen": "a", "rejected": "b"}, "missing_field"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty_completion"),
        ({"prompt": "q", "chosen": "a", "rejected": "  "}, "empty_completion"),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical_pair"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "non_string_content"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty_message"),
        (
            {"chosen": [_m("user", "q1"), _m("assistant", "a")], "rejected": [_m("user", "q2"), _m("assistant", "b")]},
            "prompt_mismatch",
        ),
        ({"prompt": "q", "chosen": [_m("robot", "a")], "rejected": "b"}, "unknown_role"),
    ],
)
def test_bad_pairs(record, reason):
    with pytest.raises(RecordError) as e:
        parse_preference(record)
    assert e.value.reason == reason


def _cfg(tmp_path: Path, **kw) -> PreferenceDataConfig:
    base = {"kind": "local", "rejects_path": str(tmp_path / "rejects.jsonl"), "val_fraction": 0.0}
    return PreferenceDataConfig.model_validate({**base, **kw})


def _rejects(tmp_path: Path) -> list[tuple[str, int | None, str]]:
    lines = (tmp_path / "rejects.jsonl").read_text().splitlines()
    return [(Path(r["file"]).name, r["line"], r["reason"]) for r in map(json.loads, lines)]


def _decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(n)]


def test_local_file_rejects_and_batches(tmp_path, chat_tokenizer_dir):
    f = tmp_path / "pairs.jsonl"
    bad = [
        "{not json",  # 7
        json.dumps({"prompt": "q", "chosen": "", "rejected": "b"}),  # 8
        json.dumps({"prompt": "q", "chosen": "x", "rejected": "x"}),  # 9
        json.dumps(
            {"chosen": [_m("user", "a"), _m("assistant", "x")], "rejected": [_m("user", "b"), _m("assistant", "y")]}
        ),
    ]
    f.write_text("\n".join([*map(json.dumps, _pairs(6)), *bad]) + "\n")
    train, val, report = build_preference_sources(
        _cfg(tmp_path, paths=[str(f)]), chat_tokenizer_dir, micro_batch_size=4, seed=3, show_progress=False
    )
    assert val is None and report["train"]["pairs"] == 6
    assert _rejects(tmp_path) == [
        ("pairs.jsonl", 7, "malformed_json"),
        ("pairs.jsonl", 8, "empty_completion"),
        ("pairs.jsonl", 9, "identical_pair"),
        ("pairs.jsonl", 10, "prompt_mismatch"),
    ]
    tok = load_tokenizer(chat_tokenizer_dir)
    batch = train.next_batch()
    assert set(batch) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "pair_ids"}
    assert all(v.dtype == torch.int64 for v in batch.values()) and batch["pair_ids"].shape == (4,)
    t = batch["chosen_input_ids"].shape[1]
    assert batch["rejected_input_ids"].shape == (4, t)
    for row, pair_id in enumerate(batch["pair_ids"].tolist()):
        source = _pairs(6)[pair_id]  # pair_ids index the pairs of the split in input order
        for side in ("chosen", "rejected"):
            ids, labels = batch[f"{side}_input_ids"][row], batch[f"{side}_labels"][row]
            text = _decode(tok, ids[ids != 0])
            assert text == f"<|bos|><|user|>{source['prompt']}<|end|><|assistant|>{source[side]}<|end|>"
            targets = labels[labels != IGNORE]
            assert _decode(tok, targets) == f"{source[side]}<|end|>"  # only the completion is a target
            pos = (labels != IGNORE).nonzero().flatten()
            assert torch.equal(labels[pos], ids[pos + 1])  # shifted: position t predicts token t+1
    assert t == max(int((batch[f"{s}_input_ids"] != 0).sum(1).max()) for s in ("chosen", "rejected"))


def test_truncation_prompt_left_then_completion_tails(tmp_path, chat_tokenizer_dir):
    long_prompt = " ".join(f"p{i}" for i in range(60))
    long_reply = " ".join(f"r{i}" for i in range(60))
    records = [
        {"prompt": long_prompt, "chosen": "short good", "rejected": "short bad"},  # 1 prompt cut on its left
        {"prompt": "q", "chosen": long_reply + " good", "rejected": long_reply + " bad"},  # 2 tails cut: identical
        {"prompt": long_prompt, "chosen": "g " + long_reply, "rejected": "b " + long_reply},  # 3 both cut
        {"prompt": "q", "chosen": "a", "rejected": "b"},  # 4 fits
    ]
    f = write_jsonl(tmp_path / "long.jsonl", records)
    train, _, report = build_preference_sources(
        _cfg(tmp_path, paths=[str(f)], max_seq_len=48, max_prompt_len=16),
        chat_tokenizer_dir,
        micro_batch_size=3,
        show_progress=False,
    )
    assert report["train"]["pairs"] == 3
    assert report["train"]["prompt_truncated"] == 2 and report["train"]["completion_truncated"] == 1
    assert [r[1:] for r in _rejects(tmp_path)] == [(2, "identical_pair")]
    tok = load_tokenizer(chat_tokenizer_dir)
    pairs = train.pairs
    for side in (pairs.chosen, pairs.rejected):
        assert int(side.lengths.max()) <= 48
    ids, trained = pairs.chosen.example(0)
    prompt = ids[~trained].tolist()
    assert len(prompt) == 16 and prompt[0] == 1  # BOS kept, the left side of the prompt dropped
    assert _decode(tok, prompt).endswith("p59<|end|><|assistant|>") and "p0 " not in _decode(tok, prompt)
    assert _decode(tok, ids[trained]) == "short good<|end|>"
    ids3, trained3 = pairs.chosen.example(1)
    assert len(ids3) == 48 and _decode(tok, ids3[trained3]).startswith("g r0 r1")


def test_pair_ids_stable_across_builds_and_epochs(tmp_path, chat_tokenizer_dir):
    f = write_jsonl(tmp_path / "p.jsonl", _pairs(10))
    kw = {"micro_batch_size": 3, "seed": 0, "show_progress": False}
    a, _, _ = build_preference_sources(_cfg(tmp_path, paths=[str(f)]), chat_tokenizer_dir, **kw)
    b, _, _ = build_preference_sources(_cfg(tmp_path, paths=[str(f)], seed=99), chat_tokenizer_dir, **kw)
    content = {}
    for src in (a, b):
        seen = []
        for _ in range(8):  # 24 rows: two epochs and a bit
            batch = src.next_batch()
            for pid, row in zip(batch["pair_ids"].tolist(), batch["chosen_input_ids"].tolist(), strict=True):
                assert content.setdefault(pid, row) == row  # same id, same pair: in every build and epoch
                seen.append(pid)
        assert sorted(seen[:10]) == sorted(seen[10:20]) == list(range(10))
    assert a.pairs.chosen.fingerprint() == b.pairs.chosen.fingerprint()


def test_finite_pass_fills_with_pair_id_minus_one_and_resume_is_exact(tmp_path, chat_tokenizer_dir):
    f = write_jsonl(tmp_path / "p.jsonl", _pairs(7))
    train, _, _ = build_preference_sources(
        _cfg(tmp_path, paths=[str(f)]), chat_tokenizer_dir, micro_batch_size=2, show_progress=False
    )
    kw = {"micro_batch_size": 3, "seed": 1, "world_size": 2, "repeat": False}
    ids, counts = [], []
    for rank in range(2):
        src = PreferenceBatchSource(train.pairs, rank=rank, **kw)
        batches = []
        while True:
            try:
                batches.append(src.next_batch())
            except StopIteration:
                break
        counts.append(len(batches))
        for batch in batches:
            filler = batch["pair_ids"] == -1
            assert (batch["chosen_labels"][filler] == IGNORE).all() and (
                batch["rejected_labels"][filler] == IGNORE
            ).all()
            ids += batch["pair_ids"][~filler].tolist()
    assert counts == [2, 2] and sorted(ids) == list(range(7))
    ref = PreferenceBatchSource(train.pairs, micro_batch_size=2, seed=5)
    want = [ref.next_batch()["pair_ids"].tolist() for _ in range(9)]
    src = PreferenceBatchSource(train.pairs, micro_batch_size=2, seed=5)
    for _ in range(4):
        src.next_batch()
    state = src.state_dict()
    resumed = PreferenceBatchSource(train.pairs, micro_batch_size=2, seed=5)
    resumed.load_state_dict(state)
    assert [resumed.next_batch()["pair_ids"].tolist() for _ in range(5)] == want[4:]


def test_hub_ultrafeedback_layout(tmp_path, chat_tokenizer_dir, monkeypatch):
    import datasets

    def record(i: int) -> dict:
        q = f"question {i}"
        chosen, rejected = [_m("user", q), _m("assistant", f"good {i}")], [_m("user", q), _m("assistant", f"bad {i}")]
        return {
            "prompt": q,
            "prompt_id": str(i),
            "chosen": chosen,
            "rejected": rejected,
            "messages": chosen,
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        }

    splits = {"train_prefs": [record(i) for i in range(12)], "test_prefs": [record(100 + i) for i in range(4)]}
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda name, cfg=None, *, split, streaming=False: datasets.Dataset.from_list(splits[split]),
    )
    cfg = _cfg(
        tmp_path, kind="hf", name="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", val_split="test_prefs"
    )
    _, val, report = build_preference_sources(cfg, chat_tokenizer_dir, micro_batch_size=2, show_progress=False)
    assert report["train"]["pairs"] == 12 and val is not None and report["val"]["pairs"] == 4


def test_embedded_stdlib_pairs(tmp_path, stdlib_tokenizer_dir):
    cfg = PreferenceDataConfig(rejects_path=str(tmp_path / "rejects.jsonl"), max_seq_len=512, max_prompt_len=256)
    train, val, report = build_preference_sources(cfg, stdlib_tokenizer_dir, micro_batch_size=2, show_progress=False)
    assert report["train"]["pairs"] > 3000 and val is not None and report["val"]["pairs"] > 20
    batch = train.next_batch()
    assert not torch.equal(batch["chosen_input_ids"], batch["rejected_input_ids"])
    # Capping the training pairs keeps every held-out pair (they sit anywhere in the stream).
    capped = cfg.model_copy(update={"max_examples": 100})
    _, _, capped_report = build_preference_sources(
        capped, stdlib_tokenizer_dir, micro_batch_size=2, show_progress=False
    )
    assert capped_report["train"]["pairs"] == 100 and capped_report["val"] == report["val"]


def test_config_checks_lengths():
    with pytest.raises(ValueError, match="max_prompt_len"):
        PreferenceDataConfig(max_seq_len=64, max_prompt_len=64)
    assert all(f.description for f in PreferenceDataConfig.model_fields.values())


def test_oversized_pairs_and_wrong_turn_orders_are_rejected_before_tokenising(tmp_path, chat_tokenizer_dir):
    u, a = ({"role": r, "content": f"{r} text"} for r in ("user", "assistant"))
    f = tmp_path / "pairs.jsonl"
    with open(f, "w") as fh:
        for rec in (
            {"prompt": "q1", "chosen": "good", "rejected": "bad"},
            {"prompt": "q2", "chosen": "c" * (20 << 20), "rejected": "bad"},  # 2 a 20 MB line
            {"prompt": [u, u], "chosen": "good", "rejected": "bad"},  # 3 two user turns
            {"prompt": [u, a], "chosen": "good", "rejected": "bad"},  # 4 the prompt ends with a reply
            {"prompt": "q5", "chosen": "good", "rejected": "bad"},
        ):
            fh.write(json.dumps(rec) + "\n")
    train, _, _ = build_preference_sources(
        _cfg(tmp_path, paths=[str(f)], max_seq_len=64, max_prompt_len=32), chat_tokenizer_dir,
        micro_batch_size=2, show_progress=False,
    )  # fmt: skip
    assert len(train.pairs) == 2
    assert _rejects(tmp_path) == [
        ("pairs.jsonl", 2, "too_large"),
        ("pairs.jsonl", 3, "roles_not_alternating"),
        ("pairs.jsonl", 4, "roles_not_alternating"),
    ]
