"""SFT data: building from every source and layout, truncation, packing, and the row batch source."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llm_pipeline.data.config import HELD_OUT_MODULES, SFTDataConfig
from llm_pipeline.data.sft import SFTBatchSource, TokenExamples, build_sft_sources, pack_best_fit
from llm_pipeline.data.tokenizer import load_tokenizer

from .corpus import write_jsonl

IGNORE = -100


# ---- synthetic examples (no tokenizer): packing and the batch source ---------------------------


def synthetic_examples(n: int, *, seed: int = 0, low: int = 4, high: int = 60) -> TokenExamples:
    """Distinct examples: BOS, the index in two tokens, random tokens; a prompt part untrained."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(low, high + 1))
        ids = [1, 7 + i % 400, 7 + i // 400, *rng.integers(7, 500, length - 3).tolist()][:length]
        prompt = int(rng.integers(1, length))
        out.append((ids, [0] * prompt + [1] * (length - prompt)))
    return TokenExamples.from_lists(out)


def check_rows(batch: dict[str, torch.Tensor], ex: TokenExamples, pad_id: int = 0) -> list[list[int]]:
    """Independent check of a batch's rows; returns the examples of each row (filler rows: [])."""
    by_tokens = {tuple(ex.example(i)[0].tolist()): i for i in range(len(ex))}
    rows = []
    for inp, lab, doc in zip(batch["input_ids"], batch["labels"], batch["document_ids"], strict=True):
        inp, lab, doc = inp.tolist(), lab.tolist(), doc.tolist()
        pos, seg, met = 0, 0, []
        while pos < len(doc) and doc[pos] != -1:
            assert doc[pos] == seg, "segments are numbered 0, 1, 2... along the row"
            end = pos
            while end < len(doc) and doc[end] == seg:
                end += 1
            i = by_tokens[tuple(inp[pos:end])]  # a whole example, never a part of one
            tokens, trained = ex.example(i)
            want = [int(t) if k else IGNORE for t, k in zip(tokens[1:], trained[1:], strict=True)] + [IGNORE]
            assert lab[pos:end] == want  # shifted targets; the last token of an example predicts nothing
            met.append(i)
            pos, seg = end, seg + 1
        assert all(d == -1 for d in doc[pos:]) and all(x == IGNORE for x in lab[pos:])
        assert all(t == pad_id for t in inp[pos:])
        rows.append(met)
    return rows


def flat(rows: list[list[int]]) -> list[int]:
    return [i for row in rows for i in row]


def naive_best_fit_rooms(lengths: list[int], capacity: int) -> list[int]:
    """Best-fit-decreasing by scanning every open row (the O(n^2) textbook version)."""
    rooms: list[int] = []
    for length in sorted(lengths, reverse=True):
        fits = [r for r in range(len(rooms)) if rooms[r] >= length]
        if fits:
            best = min(fits, key=lambda r: rooms[r])
            rooms[best] -= length
        else:
            rooms.append(capacity - length)
    return sorted(rooms)


def test_best_fit_decreasing_matches_the_textbook_algorithm():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 65, 400)
    items, offsets = pack_best_fit(lengths, 64, rng.permutation(400))
    assert sorted(items.tolist()) == list(range(400))  # every example exactly once
    fills = [int(lengths[items[offsets[r] : offsets[r + 1]]].sum()) for r in range(len(offsets) - 1)]
    assert max(fills) <= 64
    assert sorted(64 - f for f in fills) == naive_best_fit_rooms(lengths.tolist(), 64)


def test_packing_efficiency_on_a_long_tailed_length_distribution():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=5.5, sigma=1.0, size=30_000), 16, 4096).astype(np.int64)
    items, offsets = pack_best_fit(lengths, 4096, rng.permutation(len(lengths)))
    efficiency = lengths.sum() / ((len(offsets) - 1) * 4096)
    assert efficiency >= 0.95, efficiency
    assert len(items) == len(lengths)


def test_one_epoch_holds_every_example_once_with_exact_labels():
    ex = synthetic_examples(300)
    src = SFTBatchSource(ex, max_seq_len=128, micro_batch_size=1, packing=True, seed=1)
    rows = []
    for _ in range(src.rows_per_epoch):
        batch = src.next_batch()
        assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
            k: (torch.int64, (1, 128)) for k in ("input_ids", "labels", "document_ids")
        }
        rows += check_rows(batch, ex)
    assert sorted(flat(rows)) == list(range(len(ex)))  # every example once, none split
    stats = src.stats()
    assert stats["examples"] == 300 and stats["tokens"] == int(ex.lengths.sum())
    assert stats["packing_efficiency"] == pytest.approx(ex.lengths.sum() / (len(rows) * 128))
    assert stats["packing_efficiency"] > 0.95


def _epoch_rows(src: SFTBatchSource, ex: TokenExamples, n: int) -> list[list[int]]:
    return [row for _ in range(n) for row in check_rows(src.next_batch(), ex)]


def test_each_epoch_covers_all_examples_and_is_reshuffled():
    ex = synthetic_examples(200, seed=5)
    kw = {"max_seq_len": 96, "micro_batch_size": 1, "packing": True}
    src = SFTBatchSource(ex, seed=7, **kw)
    r = src.rows_per_epoch
    epochs = [_epoch_rows(src, ex, r) for _ in range(2)]
    for rows in epochs:
        assert sorted(flat(rows)) == list(range(200))
    assert epochs[0] != epochs[1]  # another row order and other neighbours
    assert {tuple(sorted(x)) for x in epochs[0]} != {tuple(sorted(x)) for x in epochs[1]}
    assert src.epoch == 2
    assert _epoch_rows(SFTBatchSource(ex, seed=7, **kw), ex, r) == epochs[0]  # deterministic given the seed
    assert _epoch_rows(SFTBatchSource(ex, seed=8, **kw), ex, r) != epochs[0]


def _rows_of(src: SFTBatchSource, n_batches: int) -> list[list[int]]:
    return [row for _ in range(n_batches) for row in src.next_batch()["input_ids"].tolist()]


@pytest.mark.parametrize("packing", [True, False])
def test_resume_is_exact_mid_epoch_and_across_the_epoch_boundary(tmp_path, packing):
    ex = synthetic_examples(90, seed=2)
    kw = {"max_seq_len": 80, "micro_batch_size": 3, "packing": packing, "seed": 4}
    ref = SFTBatchSource(ex, **kw)
    per_epoch = -(-ref.rows_per_epoch // 3)
    total = 2 * per_epoch + 2
    want = _rows_of(ref, total)
    for stop in (1, per_epoch - 1, per_epoch, per_epoch + 1):
        src = SFTBatchSource(ex, **kw)
        _rows_of(src, stop)
        torch.save(src.state_dict(), tmp_path / "state.pt")
        resumed = SFTBatchSource(ex, **kw)
        resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        assert _rows_of(resumed, total - stop) == want[stop * 3 :], stop


def test_micro_batch_size_changes_do_not_move_the_row_stream():
    ex = synthetic_examples(60, seed=9)
    a = SFTBatchSource(ex, max_seq_len=64, micro_batch_size=4, packing=True, seed=0)
    b = SFTBatchSource(ex, max_seq_len=64, micro_batch_size=4, packing=True, seed=0)
    rows_a = _rows_of(a, 6)
    b.next_batch()
    b.set_micro_batch_size(1)  # an OOM fallback halves and halves again
    assert rows_a[:4] + _rows_of(b, 20) == rows_a


def test_ranks_take_disjoint_rows_that_cover_the_epoch():
    ex = synthetic_examples(250, seed=11)
    world = 3
    single = SFTBatchSource(ex, max_seq_len=100, micro_batch_size=1, packing=True, seed=3)
    epoch = _epoch_rows(single, ex, single.rows_per_epoch)
    seen = []
    for rank in range(world):
        src = SFTBatchSource(ex, max_seq_len=100, micro_batch_size=1, packing=True, seed=3, rank=rank, world_size=world)
        mine = _epoch_rows(src, ex, len(epoch[rank::world]))
        assert mine == epoch[rank::world]  # rank r takes rows r, r+W, ... of the same epoch order
        seen += flat(mine)
    assert sorted(seen) == list(range(len(ex)))  # disjoint, and together the whole epoch


def test_finite_pass_gives_every_rank_the_same_number_of_batches():
    ex = synthetic_examples(100, seed=4)
    world, micro = 3, 4
    kw = {"max_seq_len": 64, "micro_batch_size": micro, "packing": True, "seed": 0, "world_size": world}
    sources = [SFTBatchSource(ex, rank=r, repeat=False, **kw) for r in range(world)]
    rows = sources[0].rows_per_epoch
    assert rows % (world * micro), "sizes chosen so that filler rows are needed"
    counts, seen, fillers = [], [], 0
    for src in sources:
        batches = []
        while True:
            try:
                batches.append(src.next_batch())
            except StopIteration:
                break
        counts.append(len(batches))
        for b in batches:
            assert b["input_ids"].shape == (micro, 64)
            got = check_rows(b, ex)
            seen += flat(got)
            fillers += sum(1 for row in got if not row)
    per_rank = -(-rows // world)  # ceil
    assert counts == [-(-per_rank // micro)] * world
    assert sorted(seen) == list(range(100))  # one pass, every example once
    assert fillers == counts[0] * micro * world - rows
    first = SFTBatchSource(ex, rank=0, repeat=False, **kw)
    sources[0].load_state_dict(first.state_dict())  # a fresh pass after reloading the initial state
    assert torch.equal(sources[0].next_batch()["input_ids"], first.next_batch()["input_ids"])


def test_state_from_other_data_or_sharding_is_refused():
    ex = synthetic_examples(50)
    src = SFTBatchSource(ex, max_seq_len=64, micro_batch_size=2, packing=True, seed=0, world_size=2)
    state = src.state_dict()
    assert all(isinstance(v, int | str | bool) for v in state.values())
    with pytest.raises(ValueError, match="from other data"):
        other = synthetic_examples(50, seed=1)
        SFTBatchSource(other, max_seq_len=64, micro_batch_size=2, packing=True, seed=0, world_size=2).load_state_dict(
            state
        )
    with pytest.raises(ValueError, match="world_size"):
        SFTBatchSource(ex, max_seq_len=64, micro_batch_size=2, packing=True, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="packing"):
        SFTBatchSource(ex, max_seq_len=64, micro_batch_size=2, packing=False, seed=0, world_size=2).load_state_dict(
            state
        )


def test_unpacked_rows_are_padded_to_the_longest_of_the_micro_batch():
    ex = synthetic_examples(40, seed=6)
    src = SFTBatchSource(ex, max_seq_len=64, micro_batch_size=5, packing=False, seed=0, pad_id=0)
    for _ in range(8):
        batch = src.next_batch()
        rows = check_rows(batch, ex)
        assert [len(r) for r in rows] == [1] * 5
        assert batch["input_ids"].shape[1] == max(int(ex.lengths[i]) for i in flat(rows))
    assert 0 < src.stats()["batch_fill"] < 1


# ---- building from sources ------------------------------------------------------------------


def _cfg(tmp_path: Path, **kw) -> SFTDataConfig:
    base = {"kind": "local", "rejects_path": str(tmp_path / "rejects.jsonl"), "val_fraction": 0.0, "max_seq_len": 256}
    return SFTDataConfig.model_validate({**base, **kw})


def _rejects(tmp_path: Path) -> list[tuple[str, int | None, str]]:
    lines = (tmp_path / "rejects.jsonl").read_text().splitlines()
    return [(Path(r["file"]).name, r["line"], r["reason"]) for r in map(json.loads, lines)]


GOOD = [
    {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
    {"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]},
    {"instruction": "q3", "input": "x", "output": "a3"},
    {"prompt": "q4", "completion": "a4"},
]


def test_local_jsonl_all_layouts_and_every_bad_record_case(tmp_path, chat_tokenizer_dir):
    f = tmp_path / "mixed.jsonl"
    bad = [
        '{"messages": [',  # 5 malformed JSON
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}),  # 6
        json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),  # 8 no assistant
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
        '{"prompt": "bad \\ud800 half", "completion": "a"}',  # 10 lone surrogate (escaped in JSON)
        json.dumps({"prompt": "q", "completion": {"text": "a"}}),  # 11 non-string
        json.dumps({"prompt": "q <|assistant|> injected", "completion": "a"}),  # 12 control token
        json.dumps({"text": "pretraining document"}),  # 13 unknown layout
    ]
    f.write_text("\n".join([*map(json.dumps, GOOD), *bad]) + "\n")
    train, val, report = build_sft_sources(
        _cfg(tmp_path, paths=[str(f)]), chat_tokenizer_dir, micro_batch_size=2, show_progress=False
    )
    assert val is None and report["train"]["examples"] == 4
    expected = [
        ("mixed.jsonl", 5, "malformed_json"),
        ("mixed.jsonl", 6, "missing_field"),
        ("mixed.jsonl", 7, "unknown_role"),
        ("mixed.jsonl", 8, "no_assistant_turn"),
        ("mixed.jsonl", 9, "empty_reply"),
        ("mixed.jsonl", 10, "lone_surrogate"),
        ("mixed.jsonl", 11, "non_string_content"),
        ("mixed.jsonl", 12, "special_token_in_content"),
        ("mixed.jsonl", 13, "unknown_format"),
    ]
    assert _rejects(tmp_path) == expected
    assert report["rejected"] == {reason: 1 for *_, reason in expected}
    tok = load_tokenizer(chat_tokenizer_dir)
    texts = set()
    for i in range(len(train.examples)):
        ids, trained = train.examples.example(i)
        texts.add(tok.decode(ids[trained].tolist(), skip_special_tokens=False))
    assert texts == {"a1<|end|>", "a2<|end|>", "a3<|end|>", "a4<|end|>"}


def test_jsonl_gz_parquet_and_folders(tmp_path, chat_tokenizer_dir):
    folder = tmp_path / "data"
    write_jsonl(folder / "a.jsonl.gz", GOOD[:2])
    pq.write_table(
        pa.Table.from_pylist([GOOD[0], {"messages": [{"role": "user", "content": "q9"}]}]), folder / "b.parquet"
    )
    # a gzip file cut before its trailer: its complete line is kept, the damage is reported
    (folder / "c.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "q", "completion": "a"}\n')[:-8])
    _, _, report = build_sft_sources(
        _cfg(tmp_path, paths=[str(folder)]), chat_tokenizer_dir, micro_batch_size=2, show_progress=False
    )
    assert report["train"]["examples"] == 2 + 1 + 1
    rejects = _rejects(tmp_path)
    assert ("b.parquet", 2, "no_assistant_turn") in rejects
    assert any(name == "c.jsonl.gz" and reason == "unreadable_file" for name, _, reason in rejects)


def test_no_usable_record_is_a_clear_error(tmp_path, chat_tokenizer_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}]}] * 3)
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    kw = {"micro_batch_size": 2, "show_progress": False}
    with pytest.raises(ValueError, match=r"no usable train record.*no_assistant_turn': 3.*rejects\.jsonl"):
        build_sft_sources(_cfg(tmp_path, paths=[str(bad)]), chat_tokenizer_dir, **kw)
    with pytest.raises(ValueError, match=r"no usable val record.*no_assistant_turn': 3"):
        build_sft_sources(_cfg(tmp_path, paths=[str(good)], val_paths=[str(bad)]), chat_tokenizer_dir, **kw)


def _long(n_words: int) -> str:
    return " ".join(f"w{i}" for i in range(n_words))


def test_truncation_keeps_the_prompt_and_counts_what_it_cuts_or_drops(tmp_path, chat_tokenizer_dir):
    records = [
        {"prompt": "short question", "completion": _long(200)},  # 1 over-long reply
        {"prompt": _long(300), "completion": "answer"},  # 2 over-long prompt: nothing trained is left
        {"prompt": "q", "completion": "a"},  # 3 fits
    ]
    f = write_jsonl(tmp_path / "long.jsonl", records)
    train, _, report = build_sft_sources(
        _cfg(tmp_path, paths=[str(f)], max_seq_len=64), chat_tokenizer_dir, micro_batch_size=2, show_progress=False
    )
    assert report["train"]["examples"] == 2 and report["train"]["truncated"] == 1
    assert _rejects(tmp_path) == [("long.jsonl", 2, "no_trained_tokens_after_truncation")]
    assert int(train.examples.lengths.max()) == 64
    _, _, report = build_sft_sources(
        _cfg(tmp_path, paths=[str(f)], max_seq_len=64, truncation="drop"),
        chat_tokenizer_dir,
        micro_batch_size=2,
        show_progress=False,
    )
    assert report["train"]["examples"] == 1 and report["train"]["truncated"] == 0
    assert [r[1:] for r in _rejects(tmp_path)] == [(1, "too_long"), (2, "too_long")]


def test_train_on_prompt_trains_every_token(tmp_path, chat_tokenizer_dir):
    f = write_jsonl(tmp_path / "a.jsonl", GOOD)
    kw = {"micro_batch_size": 2, "show_progress": False}
    assistant_only, _, _ = build_sft_sources(_cfg(tmp_path, paths=[str(f)]), chat_tokenizer_dir, **kw)
    everything, _, _ = build_sft_sources(_cfg(tmp_path, paths=[str(f)], train_on_prompt=True), chat_tokenizer_dir, **kw)
    assert everything.examples.trained.all()
    assert 0 < assistant_only.examples.trained.mean() < 1


class _FakeHub:
    """``datasets.load_dataset`` for named splits of in-memory records (no network)."""

    def __init__(self, splits: dict[str, list[dict]]):
        self.splits, self.calls = splits, []

    def __call__(self, name, config_name=None, *, split, streaming=False):
        import datasets

        self.calls.append((name, config_name, split, streaming))
        ds = datasets.Dataset.from_list(self.splits[split])
        return ds.to_iterable_dataset() if streaming else ds


def _ultrachat(i: int) -> dict:
    q = f"question {i}"
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": f"answer {i}"}]
    return {"prompt": q, "prompt_id": f"id{i}", "messages": msgs}


def test_hub_ultrachat_layout_streamed_with_its_test_split(tmp_path, chat_tokenizer_dir, monkeypatch):
    import datasets

    hub = _FakeHub(
        {"train_sft": [_ultrachat(i) for i in range(30)], "test_sft": [_ultrachat(100 + i) for i in range(5)]}
    )
    monkeypatch.setattr(datasets, "load_dataset", hub)
    names = {"name": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "val_split": "test_sft"}
    cfg = _cfg(tmp_path, kind="hf", streaming=True, max_examples=20, **names)
    _, val, report = build_sft_sources(cfg, chat_tokenizer_dir, micro_batch_size=2, show_progress=False)
    assert report["train"]["examples"] == 20 and val is not None and report["val"]["examples"] == 5
    assert hub.calls == [
        ("HuggingFaceH4/ultrachat_200k", None, "train_sft", True),
        ("HuggingFaceH4/ultrachat_200k", None, "test_sft", True),
    ]


def test_hub_tulu_layout_with_a_hashed_validation_share(tmp_path, chat_tokenizer_dir, monkeypatch):
    import datasets

    turns = [("system", "sys"), ("user", "q{}"), ("assistant", "a{}")]
    records = [
        {"id": f"t{i}", "source": "s", "messages": [{"role": r, "content": c.format(i)} for r, c in turns]}
        for i in range(200)
    ]
    records[7]["messages"][2]["role"] = "tool"
    monkeypatch.setattr(datasets, "load_dataset", _FakeHub({"train": records}))
    cfg = _cfg(tmp_path, kind="hf", name="allenai/tulu-3-sft-mixture", val_fraction=0.1)
    _, val, report = build_sft_sources(cfg, chat_tokenizer_dir, micro_batch_size=2, show_progress=False)
    assert val is not None and 5 <= report["val"]["examples"] <= 40
    assert report["train"]["examples"] + report["val"]["examples"] == 199
    assert [r[1:] for r in _rejects(tmp_path)] == [(8, "unknown_role")]


def test_embedded_stdlib_default_is_deterministic_and_validates_on_held_out_modules(tmp_path, stdlib_tokenizer_dir):
    from llm_pipeline.data.stdlib_chat import _stdlib_functions, stdlib_functions, stdlib_sft_records

    functions = stdlib_functions(HELD_OUT_MODULES)
    assert {f.module.split(".")[0] for f in functions if f.split == "val"} <= set(HELD_OUT_MODULES)
    assert not any(f.module.split(".")[0] in HELD_OUT_MODULES for f in functions if f.split == "train")
    records = list(stdlib_sft_records(functions))
    assert len(records) > 3000
    assert any(len(r.record["messages"]) >= 4 for r in records)  # multi-turn ones
    fresh = stdlib_sft_records(_stdlib_functions.__wrapped__(tuple(HELD_OUT_MODULES)))  # not the cached parse
    assert [(r.where, r.record) for r in fresh] == [(r.where, r.record) for r in records]  # deterministic
    cfg = SFTDataConfig(rejects_path=str(tmp_path / "rejects.jsonl"), max_seq_len=1024)
    _, val, report = build_sft_sources(cfg, stdlib_tokenizer_dir, micro_batch_size=2, show_progress=False)
    assert val is not None and report["val"]["examples"] > 20
    assert report["train"]["packing_efficiency"] >= 0.95


def test_config_is_strict_and_checks_its_source():
    with pytest.raises(ValueError, match="paths"):
        SFTDataConfig(kind="local")
    with pytest.raises(ValueError, match="name"):
        SFTDataConfig(kind="hf")
    with pytest.raises(ValueError, match="paths only apply to kind=local"):
        SFTDataConfig(paths=["a.jsonl"])
    with pytest.raises(ValueError, match="extra"):
        SFTDataConfig.model_validate({"max_seq_lne": 10})
    assert all(f.description for f in SFTDataConfig.model_fields.values())


# ---- sizes before tokenising, and the conversation rule -------------------------------------


def test_a_giant_record_is_rejected_by_size_without_being_read_whole_or_tokenised(
    tmp_path, chat_tokenizer_dir, monkeypatch
):
    """A ~20 MB line costs neither memory nor tokenizer time: it is skipped in pieces and counted."""
    import tracemalloc

    from llm_pipeline.data.chat import ChatTemplate

    seen: list[int] = []
    encode_many = ChatTemplate.encode_many

    def spy(self, conversations, **kw):
        seen.extend(sum(len(m["content"]) for m in c) for c in conversations)
        return encode_many(self, conversations, **kw)

    monkeypatch.setattr(ChatTemplate, "encode_many", spy)
    giant = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * (20 << 20)}]}
    over = {"prompt": "q", "completion": "y" * (70 << 10)}  # a line under the read cap, a record over the limit
    f = tmp_path / "big.jsonl"
    with open(f, "w") as fh:
        for rec in (GOOD[0], giant, GOOD[1], over, GOOD[3]):
            fh.write(json.dumps(rec) + "\n")
    del giant
    cfg = _cfg(tmp_path, paths=[str(f)])
    assert cfg.record_byte_limit == 64 << 10  # max_seq_len 256: the floor

    tracemalloc.start()
    try:
        _, _, report = build_sft_sources(cfg, chat_tokenizer_dir, micro_batch_size=2, show_progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB: the 20 MiB line was held"
    assert max(seen) < 100 and len(seen) == 3  # the tokenizer saw the three small records only
    assert report["train"]["examples"] == 3
    assert report["rejected"] == {"too_large": 2}
    assert _rejects(tmp_path) == [("big.jsonl", 2, "too_large"), ("big.jsonl", 4, "too_large")]
    detail = [json.loads(x)["detail"] for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert "line of 20971" in detail[0] and "data.max_seq_len=256" in detail[1]


def test_record_limit_follows_max_seq_len_and_applies_to_every_source(tmp_path, chat_tokenizer_dir):
    assert SFTDataConfig(max_seq_len=4096).record_byte_limit == 64 * 4096
    folder = tmp_path / "data"
    big = {"prompt": "q", "completion": "z" * (80 << 10)}
    pq.write_table(pa.Table.from_pylist([GOOD[3], big]), folder.mkdir() or folder / "a.parquet")
    _, _, report = build_sft_sources(
        _cfg(tmp_path, paths=[str(folder)]), chat_tokenizer_dir, micro_batch_size=2, show_progress=False
    )
    assert report["rejected"] == {"too_large": 1} and _rejects(tmp_path) == [("a.parquet", 2, "too_large")]
    # a larger max_seq_len admits the same record (it is then truncated, as before)
    _, _, report = build_sft_sources(
        _cfg(tmp_path, paths=[str(folder)], max_seq_len=2048), chat_tokenizer_dir, micro_batch_size=2,
        show_progress=False,
    )  # fmt: skip
    assert report["rejected"] == {} and report["train"]["truncated"] == 1


def test_conversation_rule_rejects_wrong_turn_orders_with_reasons(tmp_path, chat_tokenizer_dir):
    """System first (optional), then user/assistant alternating from the user: other orders are counted rejects."""
    u, a, s = ({"role": r, "content": f"{r} text"} for r in ("user", "assistant", "system"))
    records = [
        {"messages": [s, u, a, u, a]},  # fine: system, then alternating
        {"messages": [a, u, a]},  # 2 assistant first
        {"messages": [s, a, u, a]},  # 3 assistant first after the system prompt
        {"messages": [u, s, a]},  # 4 a system turn mid-conversation
        {"messages": [u, a, s, u, a]},  # 5 likewise, later
        {"messages": [u, u, a]},  # 6 two user turns in a row
        {"messages": [u, a, a]},  # 7 two assistant turns in a row
        {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "r"},
            ]
        },
        {"messages": [u, a, u]},  # 9 fine: the trailing prompt without a reply is dropped (documented)
        {"system": "be brief", "messages": [u, a]},  # 10 fine: the system field becomes the first turn
    ]
    f = write_jsonl(tmp_path / "turns.jsonl", records)
    _, _, report = build_sft_sources(
        _cfg(tmp_path, paths=[str(f)]), chat_tokenizer_dir, micro_batch_size=2, show_progress=False
    )
    assert report["train"]["examples"] == 3
    assert _rejects(tmp_path) == [
        ("turns.jsonl", 2, "assistant_first"),
        ("turns.jsonl", 3, "assistant_first"),
        ("turns.jsonl", 4, "system_not_first"),
        ("turns.jsonl", 5, "system_not_first"),
        ("turns.jsonl", 6, "roles_not_alternating"),
        ("turns.jsonl", 7, "roles_not_alternating"),
        ("turns.jsonl", 8, "roles_not_alternating"),
    ]
    assert report["rejected"] == {"assistant_first": 2, "roles_not_alternating": 3, "system_not_first": 2}


def test_stdlib_sft_source_keeps_only_the_asked_conversations():
    """``stdlib_records: [ask]`` (the CPU demo's SFT): the short summaries only, no function sources."""
    from unittest import mock

    from llm_pipeline.data.config import SFTDataConfig
    from llm_pipeline.data.stdlib_chat import StdlibFunction, sft_records_of

    header = 'def dumps(obj):\n    """Serialize obj."""'
    fn = StdlibFunction("json", "dumps", "json/__init__.py", 1, header, "Serialize obj to a JSON formatted str.",
                        header + '\n    return ""', 2, "train")  # fmt: skip
    with mock.patch("llm_pipeline.data.stdlib_chat.stdlib_functions", return_value=[fn]):
        asked = list(sft_records_of(SFTDataConfig(kind="stdlib", stdlib_records=["ask"])))
        every = list(sft_records_of(SFTDataConfig(kind="stdlib")))
    assert [i.doc_id for i in asked] == ["json.dumps:ask"]
    assert asked[0].record["messages"][-1]["content"] == fn.summary
    assert {i.doc_id for i in every} >= {"json.dumps:ask", "json.dumps:write"}
