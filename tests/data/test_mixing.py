"""Weighted mixtures of sources: exact interleaving of the inner streams, shares, determinism, resume, padding."""

from __future__ import annotations

import random

import pytest
import torch

from llm_pipeline.data.loader import IGNORE_INDEX, PackedTokenDataset, TokenBatchLoader
from llm_pipeline.data.mixing import RowMixture, TokenMixture, WeightedMixture
from llm_pipeline.data.pack import pack_documents
from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer

from .corpus import random_doc, write_jsonl


@pytest.fixture(scope="module")
def packed_pair(tmp_path_factory):
    """Two packed datasets (domain, general) with one tokenizer, as the LoRA stage reads them."""
    tmp = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)
    docs = [{"id": f"d{i:04d}", "text": random_doc(rng, rng.randint(20, 200))} for i in range(160)]
    tok = train_tokenizer((d["text"] for d in docs), vocab_size=300)
    save_tokenizer(tok, tmp / "tok")
    for name, part in (("domain", docs[:60]), ("general", docs[60:])):
        write_jsonl(tmp / name / "clean" / "00000.jsonl.gz", part)
        pack_documents(tmp / name / "clean", tmp / name / "packed", tmp / "tok", val_fraction=0.0, show_progress=False)
    return tmp / "domain" / "packed", tmp / "general" / "packed"


def _loader(root, seed=0):
    return TokenBatchLoader(PackedTokenDataset(root, "train"), seq_len=16, micro_batch_size=1, seed=seed, chunk_len=64)


def _two(domain_fraction: float) -> dict[str, float]:
    return {"domain": domain_fraction, "general": 1 - domain_fraction}


def _token_mixer(packed_pair, **kw):
    domain, general = packed_pair
    sources = {"domain": _loader(domain), "general": _loader(general, seed=1)}
    mixer = WeightedMixture(sources, _two(kw.pop("domain_fraction", 0.7)), **{"seed": 5, **kw})
    mixer.set_seq_len(16, 4)
    return mixer


class ToyRows:
    """A row source: row n is ``[1000·source + n, 1, 2, ...]`` of length ``base + n % 4``, padded per micro-batch
    to its longest row with its own convention (input 0, label -100, document id 1)."""

    def __init__(self, source: int, base: int) -> None:
        self.source, self.base, self.n, self.rows = source, base, 0, 1

    def set_micro_batch_size(self, rows: int) -> None:
        self.rows = rows

    def next_batch(self) -> dict[str, torch.Tensor]:
        lengths = [self.base + (self.n + i) % 4 for i in range(self.rows)]
        shape = (self.rows, max(lengths))
        ids, labels, docs = torch.zeros(shape, dtype=torch.long), torch.full(shape, IGNORE_INDEX), torch.ones(shape)
        for i, length in enumerate(lengths):
            ids[i, :length] = torch.arange(length)
            ids[i, 0] = 1000 * self.source + self.n + i
            labels[i, :length], docs[i, :length] = ids[i, :length], 0
        self.n += self.rows
        return {"input_ids": ids, "labels": labels, "document_ids": docs.long()}

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


def _row_mixer(rows: int = 4, **kw) -> WeightedMixture:
    shares = _two(kw.pop("domain_fraction", 0.8))
    mixer = WeightedMixture({"domain": ToyRows(1, 3), "general": ToyRows(2, 9)}, shares, **{"seed": 0, **kw})
    mixer.set_micro_batch_size(rows)
    return mixer


def test_a_state_of_the_older_two_source_mixer_is_named_with_what_to_do():
    """A LoRA checkpoint written by ``MixedBatchSource`` (before data mixtures) has no ``kind``: say it came from
    that mixer and how to go on, not that the run had a single source (review #10)."""
    old = {
        "rows_drawn": 8, "micro_batch_size": 4, "seed": 0, "rank": 0, "domain_fraction": 0.8,
        "counts": {"domain_rows": 6, "general_rows": 2, "domain_tokens": 40, "general_tokens": 30},
        "domain": {"n": 6}, "general": {"n": 2},
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"older two-source domain/general mixer .* restart the stage") as e:
        _row_mixer().load_state_dict(old)
    assert "single data source" not in str(e.value)
    with pytest.raises(ValueError, match="started with a single data source"):
        _row_mixer().load_state_dict({"n": 3})  # one loader's state


def _row_ids(mixer: WeightedMixture, batches: int) -> list[int]:
    return [int(v) for _ in range(batches) for v in mixer.next_batch()["input_ids"][:, 0]]


def test_token_mixing_interleaves_both_streams_row_for_row(packed_pair):
    """Every mixed row is the next unused row of the domain or the general stream: none lost, none repeated."""
    mixer = _token_mixer(packed_pair)
    domain, general = _loader(packed_pair[0]), _loader(packed_pair[1], seed=1)
    want = {"domain": domain.next_batch(), "general": general.next_batch()}
    counts = {"domain": 0, "general": 0}
    tokens = {"domain": 0, "general": 0}
    for _ in range(40):
        batch = mixer.next_batch()
        assert batch["input_ids"].shape == (4, 16)
        for i in range(4):
            row = {k: v[i : i + 1] for k, v in batch.items()}
            name = "domain" if torch.equal(row["input_ids"], want["domain"]["input_ids"]) else "general"
            for k in row:
                assert torch.equal(row[k], want[name][k]), (name, k)
            counts[name] += 1
            tokens[name] += int((row["labels"] != IGNORE_INDEX).sum())
            want[name] = (domain if name == "domain" else general).next_batch()
    c = mixer.counts()
    assert (c["domain"]["rows"], c["general"]["rows"]) == (counts["domain"], counts["general"])
    assert (c["domain"]["trained_tokens"], c["general"]["trained_tokens"]) == (tokens["domain"], tokens["general"])
    assert c["domain"]["tokens"] == 16 * counts["domain"]
    assert abs(counts["domain"] - 0.7 * 160) <= 2  # every prefix is within a couple of rows of the share


def test_realised_ratio_and_the_extremes():
    mixer = _row_mixer(rows=8)
    for _ in range(100):  # every prefix of the stream is within two rows of the share: no sampling noise
        _row_ids(mixer, 1)
        assert abs(mixer.counts()["domain"]["rows"] - 0.8 * mixer.rows_drawn) <= 2
    for p, source in ((1.0, 1), (0.0, 2)):
        ids = _row_ids(_row_mixer(domain_fraction=p), 20)
        assert {i // 1000 for i in ids} == {source} and ids == sorted(ids)  # one stream, in order


def test_pattern_depends_on_the_row_counter_not_the_micro_batch_size():
    """The source of row n is a function of (seed, rank, shares, n): halving the micro-batch (OOM fallback) or
    changing it keeps the same rows in the same order."""
    assert _row_ids(_row_mixer(rows=4), 10) == _row_ids(_row_mixer(rows=2), 20) == _row_ids(_row_mixer(rows=5), 8)


def test_deterministic_per_seed_and_rank():
    assert _row_ids(_row_mixer(seed=3), 10) == _row_ids(_row_mixer(seed=3), 10)
    assert _row_ids(_row_mixer(seed=3), 10) != _row_ids(_row_mixer(seed=4), 10)
    assert _row_ids(_row_mixer(rank=1), 10) != _row_ids(_row_mixer(rank=0), 10)


def test_rows_are_padded_to_a_common_width():
    """Each toy source pads its own rows (input 0, document 1); the mixer pads what is left to the
    batch's widest row with its values (input ``pad_id``, label -100, document -1), after the row's own."""
    mixer = _row_mixer(rows=6, pad_id=7)
    mixer_padded = 0
    for _ in range(10):
        batch = mixer.next_batch()
        real = (batch["labels"] != IGNORE_INDEX).sum(dim=1)
        width = batch["input_ids"].shape[1]
        assert width == int(real.max())  # as wide as the longest real row, no wider
        for i, n in enumerate(real.tolist()):
            assert torch.equal(batch["input_ids"][i, 1:n], torch.arange(1, n))  # real tokens untouched
            assert batch["document_ids"][i, :n].eq(0).all()
            docs, ids = batch["document_ids"][i, n:], batch["input_ids"][i, n:]
            inner = int(docs.eq(1).sum())
            assert docs[:inner].eq(1).all() and ids[:inner].eq(0).all()  # the source's own padding first
            assert docs[inner:].eq(-1).all() and ids[inner:].eq(7).all()  # then the mixer's
            assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
            mixer_padded += width - n - inner
    assert mixer_padded > 0


@pytest.mark.parametrize("kind", ["tokens", "rows"])
def test_resume_gives_identical_next_batches(packed_pair, kind):
    def make():
        return _token_mixer(packed_pair) if kind == "tokens" else _row_mixer(rows=3)

    a = make()
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(6)]
    b = make()
    b.next_batch()  # a fresh job may have moved before loading: the state must override that
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert a.stats() == b.stats() and a.state_dict()["counts"] == b.state_dict()["counts"]


def test_protocol_follows_the_inner_sources(packed_pair):
    tokens = _token_mixer(packed_pair)
    rows = _row_mixer()
    assert isinstance(tokens, TokenMixture) and isinstance(rows, RowMixture)
    assert hasattr(tokens, "set_seq_len") and not hasattr(tokens, "set_micro_batch_size")
    assert hasattr(rows, "set_micro_batch_size") and not hasattr(rows, "set_seq_len")
    with pytest.raises(TypeError, match="all be token streams or all row sources"):
        WeightedMixture({"a": _loader(packed_pair[0]), "b": ToyRows(1, 3)}, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="negative"):
        _row_mixer(domain_fraction=1.5)
    with pytest.raises(ValueError, match="seed"):
        _row_mixer(seed=1).load_state_dict(_row_mixer(seed=2).state_dict())
    with pytest.raises(RuntimeError, match="micro-batch size"):
        WeightedMixture({"a": ToyRows(1, 3), "b": ToyRows(2, 3)}, {"a": 1, "b": 1}).next_batch()


@pytest.fixture(scope="module")
def packed_three(tmp_path_factory):
    """Three packed corpora of different sizes (one tokenizer), as a pretraining mixture reads them."""
    tmp = tmp_path_factory.mktemp("mix3")
    rng = random.Random(1)
    docs = [{"id": f"d{i:04d}", "text": random_doc(rng, rng.randint(20, 200))} for i in range(150)]
    tok = train_tokenizer((d["text"] for d in docs), vocab_size=300)
    save_tokenizer(tok, tmp / "tok")
    out = {}
    for name, part in (("web", docs[:80]), ("code", docs[80:120]), ("math", docs[120:])):
        write_jsonl(tmp / name / "clean" / "00000.jsonl.gz", part)
        pack_documents(tmp / name / "clean", tmp / name / "packed", tmp / "tok", val_fraction=0.0, show_progress=False)
        out[name] = tmp / name / "packed"
    return out


SHARES = {"web": 0.5, "code": 0.3, "math": 0.2}


def _three(packed_three, seed: int = 0) -> WeightedMixture:
    loaders = {
        n: TokenBatchLoader(PackedTokenDataset(p, "train"), seq_len=8, micro_batch_size=1, seed=seed, chunk_len=32)
        for n, p in packed_three.items()
    }
    return WeightedMixture(loaders, SHARES, unit="tokens", seed=seed)


# A few hundred steps of 64 rows: a context-length curriculum 8 -> 16 -> 32 (rows keep 512 tokens per
# micro-batch) and an OOM halving of the micro-batch at step 150.
def _plan(step: int) -> tuple[int, int]:
    seq = 8 if step < 100 else 16 if step < 200 else 32
    micro = (512 // seq) // (2 if step >= 150 else 1)
    return seq, micro


def _run(mixer: WeightedMixture, start: int, end: int) -> list[torch.Tensor]:
    out = []
    for step in range(start, end):
        seq, micro = _plan(step)
        mixer.set_seq_len(seq, micro)
        out += [mixer.next_batch()["input_ids"] for _ in range(512 // (seq * micro) or 1)]
    return out


def test_three_source_token_shares_within_one_percent_across_curriculum_and_oom(packed_three):
    """0.5/0.3/0.2 over 300 steps (the small sources are repeated many times): realised token shares within
    1% of the weights, and the stream resumes bit for bit from a mid-run state with the same shares."""
    mixer = _three(packed_three)
    first = _run(mixer, 0, 170)
    state = mixer.state_dict()
    rest = _run(mixer, 170, 300)
    stats = mixer.stats()
    for name, w in SHARES.items():
        assert stats[f"mix/{name}/share"] == pytest.approx(w, abs=0.01), name
        assert stats[f"mix/{name}/weight"] == pytest.approx(w)
    assert mixer.passes()["math"] > 1  # the smallest source ran out and is being repeated

    resumed = _three(packed_three)
    resumed.load_state_dict(state)
    again = _run(resumed, 170, 300)
    assert all(torch.equal(a, b) for a, b in zip(rest, again, strict=True))
    assert resumed.stats() == stats
    assert first and _three(packed_three, seed=1).state_dict() != state  # another seed, another stream


def test_token_counts_are_the_batches_whenever_they_are_read(packed_three):
    """A token mixture keeps each row's counts aside and settles them when read (and every few blocks): read
    after every batch or only at the end, across blocks and seq_len changes, they are the emitted batches'
    own counts (and reading them changes no batch)."""
    from llm_pipeline.data.mixing import BLOCK

    eager, lazy = _three(packed_three), _three(packed_three)
    order = WeightedMixture({n: _Idle() for n in SHARES}, SHARES).source_of_rows(0, 8 * BLOCK).tolist()
    want = {n: dict.fromkeys(("rows", "tokens", "trained_tokens", "examples"), 0) for n in SHARES}
    start = 0
    for seq, micro, batches in ((8, 7, 320), (16, 5, 150), (8, 3, 100)):
        for mixer in (eager, lazy):
            mixer.set_seq_len(seq, micro)
        for _ in range(batches):
            a, b = eager.next_batch(), lazy.next_batch()
            assert all(torch.equal(a[k], b[k]) for k in a)
            for r, i in enumerate(order[start : start + micro]):
                for k, v in eager._batch_counts({k: t[r : r + 1] for k, t in a.items()}).items():  # generic path
                    want[eager.names[i]][k] += v
            start += micro
            assert eager.counts() == want
        assert len(lazy._pending_starts) < 4 * BLOCK  # settled on its own past 2048 rows, and at seq_len changes
    assert lazy.counts() == want and lazy.state_dict()["counts"] == want


def test_token_counts_of_micro_batches_longer_than_a_block(packed_three):
    """A micro-batch of more rows than a block of draws spans several blocks: the settled counts take each
    row's source from the block it is in (kept until its rows are settled), and equal the batches' own."""
    from llm_pipeline.data.mixing import BLOCK

    eager, lazy = _three(packed_three), _three(packed_three)
    micro = 2 * BLOCK + 76
    order = WeightedMixture({n: _Idle() for n in SHARES}, SHARES).source_of_rows(0, 3 * micro + 5).tolist()
    want = {n: dict.fromkeys(("rows", "tokens", "trained_tokens", "examples"), 0) for n in SHARES}
    start = 0
    for rows in (5, micro, micro, micro):  # a first batch inside block 0, then batches across blocks
        for mixer in (eager, lazy):
            mixer.set_seq_len(8, rows)
        a, b = eager.next_batch(), lazy.next_batch()
        assert all(torch.equal(a[k], b[k]) for k in a)
        trained = (a["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
        for r, i in enumerate(order[start : start + rows]):
            c = want[eager.names[i]]
            c["rows"], c["tokens"], c["examples"] = c["rows"] + 1, c["tokens"] + 8, c["examples"] + 1
            c["trained_tokens"] += trained[r]
        start += rows
        assert eager.counts() == want
        assert len(lazy._recent) <= 8  # the block orders kept for the settle are only those of unsettled rows
    assert lazy.counts() == want


def test_a_repeated_source_is_warned_about_unless_its_epochs_allow_it(packed_three, caplog):
    mixer = _three(packed_three)
    with caplog.at_level("INFO", logger="llm_pipeline.data.mixing"):
        _run(mixer, 0, 120)
    assert any("'math' ran out and is repeated" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    caplog.clear()
    mixer = _three(packed_three)
    mixer.allowed_epochs = dict.fromkeys(SHARES, 1000.0)
    with caplog.at_level("INFO", logger="llm_pipeline.data.mixing"):
        _run(mixer, 0, 120)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("upsampled as configured" in r.getMessage() for r in caplog.records)


def test_shares_of_examples_account_for_packed_rows():
    """Example weights draw rows at weight / examples-per-row: a source packing 4 examples a row gets a
    quarter of the rows for the same example share."""
    a, b = ToyRows(1, 3), ToyRows(2, 3)
    a.mean_examples_per_row, b.mean_examples_per_row = 4.0, 1.0  # type: ignore[attr-defined]
    mixer = WeightedMixture({"a": a, "b": b}, {"a": 0.5, "b": 0.5}, unit="examples")
    assert mixer.row_weights.tolist() == pytest.approx([0.2, 0.8])


class _Sized(ToyRows):
    """A packed SFT source's size: ``rows_per_epoch`` rows holding ``mean_examples_per_row`` examples each."""

    def __init__(self, source: int, rows: int, per_row: float) -> None:
        super().__init__(source, 3)
        self.rows_per_epoch, self.mean_examples_per_row = rows, per_row


class _Section:
    """What :func:`build_mixture` reads of a stage's data section with ``data.sources``."""

    budget_key = "examples"

    def __init__(self, entries: dict) -> None:
        self.sources, self._entries = list(entries.values()), entries

    def mixture_weights(self) -> dict:
        return self._entries

    def source_configs(self) -> dict:
        return dict.fromkeys(self._entries)

    def eval_primary(self) -> None:
        return None


def test_epochs_of_an_example_mixture_do_not_depend_on_packing_density():
    """``epochs: 1`` on every source is a concatenation (docs/data.md): 800 short examples packed 8 a row and
    100 long ones 1 a row are each passed over once in 200 rows, whatever their packing (review #3)."""
    from llm_pipeline.data.mixing import build_mixture, planned_epochs
    from llm_pipeline.data.mixture_config import MixtureSource

    sources = {"short": _Sized(1, 100, 8.0), "long": _Sized(2, 100, 1.0)}
    entries = {n: MixtureSource(name=n, epochs=1) for n in sources}
    mixer, _ = build_mixture(_Section(entries), lambda n, cfg: (sources[n], None), unit="examples", seed=0, rank=0)
    assert mixer.shares == pytest.approx({"short": 800 / 900, "long": 100 / 900})  # shares of examples
    assert mixer.row_weights.tolist() == pytest.approx([0.5, 0.5])  # one pass of rows over each
    assert planned_epochs(mixer, 200) == pytest.approx({"short": 1.0, "long": 1.0})
    entries["short"] = MixtureSource(name="short", epochs=2)  # twice over the short ones: 2/3 of the rows
    mixer, _ = build_mixture(_Section(entries), lambda n, cfg: (sources[n], None), unit="examples", seed=0, rank=0)
    assert planned_epochs(mixer, 300) == pytest.approx({"short": 2.0, "long": 1.0})


def _pretrain_sources(sources: list[dict], tmp_path):
    """A pretraining mixture as the runner has it before training: built, and its plan checked."""
    from llm_pipeline.train.config import PretrainConfig
    from llm_pipeline.train.mixture import check_mixture_plan
    from llm_pipeline.train.parallel import DistInfo
    from llm_pipeline.train.pretrain import build_sources

    cfg = PretrainConfig.model_validate(
        {
            "data": {"sources": sources},
            "curriculum": [{"step": 0, "seq_len": 16}],
            "training": {"global_batch_tokens": 64, "max_steps": 10, "output_dir": str(tmp_path / "o")},
        }
    )
    train, val = build_sources(cfg, DistInfo())
    check_mixture_plan(cfg, train, DistInfo())
    return train, val


def test_sources_of_different_tokenizers_are_refused_naming_both(packed_three, tmp_path):
    rng = random.Random(5)
    docs = [{"id": f"x{i}", "text": random_doc(rng, 80)} for i in range(40)]
    save_tokenizer(train_tokenizer((d["text"] for d in docs), vocab_size=280), tmp_path / "tok")
    write_jsonl(tmp_path / "clean" / "00000.jsonl.gz", docs)
    pack_documents(tmp_path / "clean", tmp_path / "packed", tmp_path / "tok", val_fraction=0.0, show_progress=False)
    sources = [
        {"name": "web", "weight": 0.5, "path": str(packed_three["web"]), "val_split": None},
        {"name": "other", "weight": 0.5, "path": str(tmp_path / "packed"), "val_split": None},
    ]
    with pytest.raises(ValueError, match="data sources 'web' and 'other' were tokenized with different tokenizers"):
        _pretrain_sources(sources, tmp_path)


def test_a_source_with_no_tokens_left_is_refused_naming_it(packed_three, tmp_path):
    sources = [
        {"name": "web", "weight": 0.5, "path": str(packed_three["web"]), "val_split": None},
        {"name": "empty", "weight": 0.5, "path": str(packed_three["code"]), "train_split": "val", "val_split": None},
    ]
    with pytest.raises(ValueError, match=r"data source 'empty': .*split 'val' is empty"):
        _pretrain_sources(sources, tmp_path)


def test_a_cap_on_passes_is_checked_before_training(packed_three, tmp_path):
    sources = [
        {"name": "web", "weight": 0.5, "path": str(packed_three["web"]), "val_split": None},
        {"name": "math", "weight": 0.5, "path": str(packed_three["math"]), "val_split": None, "max_epochs": 0.001},
    ]
    with pytest.raises(ValueError, match=r"data source 'math': the run would pass over it .* more than its max_epochs"):
        _pretrain_sources(sources, tmp_path)


def test_stdlib_docs_can_be_a_source_of_their_own():
    """``source.docs_split``: the stdlib's .rst/.txt files outside held-out and domain modules are split `docs`
    (the demo pretraining mixes them with the code); off, nothing changes (nor the download fingerprint)."""
    from llm_pipeline.data.config import DataConfig, SourceConfig
    from llm_pipeline.data.sources import iter_stdlib, source_fingerprint

    cfg = SourceConfig(docs_split=True, held_out_modules=["json"], max_documents=None)
    splits = {}
    for item in iter_stdlib(cfg):
        splits.setdefault(item.meta.get("split", "train"), set()).add(item.doc_id.rsplit(".", 1)[-1])
    assert splits["docs"] <= {"rst", "txt"} and "py" not in splits["docs"] and splits["train"] == {"py"}
    plain = DataConfig()
    assert source_fingerprint(plain) == source_fingerprint(DataConfig(source={"docs_split": False}))
    assert source_fingerprint(plain) != source_fingerprint(DataConfig(source={"docs_split": True}))
    with pytest.raises(ValueError, match="docs_split only applies to kind=stdlib"):
        SourceConfig(kind="local", paths=["x"], docs_split=True)


# ---- the order's fast path against the rule itself ----------------------------------------------


def _reference_order(row_weights, seed: int, rank: int, rows: int) -> list[int]:
    """The mixing rule written out plainly, row by row: row n (1-based) goes to the first source with the
    largest ``weight·n - count + jitter``, jitter drawn per block of ``BLOCK`` rows from (seed, rank, block)."""
    import math

    import numpy as np

    from llm_pipeline.data.mixing import BLOCK

    weights = [float(w) for w in row_weights]
    counts = [0] * len(weights)
    out: list[int] = []
    for n in range(1, rows + 1):
        block, j = divmod(n - 1, BLOCK)
        if j == 0:
            jitter = np.random.default_rng([seed, rank, block]).random((BLOCK, len(weights))).tolist()
        best, top = 0, -math.inf
        for i, w in enumerate(weights):
            if w <= 0:
                continue
            score = w * n - counts[i] + jitter[j][i]
            if score > top:
                best, top = i, score
        counts[best] += 1
        out.append(best)
    return out


class _Idle:
    """A token-stream stand-in: the order does not look at the data."""

    def set_seq_len(self, seq_len: int, micro_batch_size: int) -> None: ...

    def next_batch(self) -> dict[str, torch.Tensor]:
        raise AssertionError("not called")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def _budget_shares() -> dict[str, float]:
    """Shares as ``data.sources`` resolves them from a token budget, an epochs budget and a weight."""
    from llm_pipeline.data.mixture_config import MixtureSource, resolve_shares

    entries = {
        "web": MixtureSource(name="web", tokens=7_000_001),
        "code": MixtureSource(name="code", epochs=2.5),
        "math": MixtureSource(name="math", tokens=1_234_567),
        "off": MixtureSource(name="off", weight=0.0),
    }
    return resolve_shares(entries, {"web": 1e9, "code": 1_111_111.0, "math": 5e5, "off": 1e6}, "tokens")


@pytest.mark.parametrize(
    "shares",
    [
        {"web": 0.5, "code": 0.3, "math": 0.2},
        {"off": 0.0, "web": 0.7, "none": 0.0, "math": 0.3},  # sources of share 0, first among them
        {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3},  # ties broken by position
        {"a": 0.98, "b": 0.01, "c": 0.005, "d": 0.005},
        {"only": 1.0, "off": 0.0},
        "budgets",
    ],
)
def test_block_order_equals_the_plain_rule(shares):
    """The block-wise order (each block drawn once, its end counts carried) equals the rule written out row
    by row, over several blocks, whatever the micro-batch size, also when rows straddle a block boundary."""
    from llm_pipeline.data.mixing import BLOCK

    shares = _budget_shares() if shares == "budgets" else shares
    rows = 4 * BLOCK + 77
    for seed, rank in ((0, 0), (7, 3)):
        mixer = WeightedMixture({n: _Idle() for n in shares}, shares, seed=seed, rank=rank)
        want = _reference_order(mixer.row_weights, seed, rank, rows)
        assert mixer.source_of_rows(0, rows).tolist() == want
        for micro in (8, 7, 100):  # 7 and 100 straddle block boundaries
            mixer = WeightedMixture({n: _Idle() for n in shares}, shares, seed=seed, rank=rank)
            got = [i for start in range(0, rows, micro) for i in mixer._source_list(start, min(micro, rows - start))]
            assert got == want, micro
            assert mixer._quota_block == (rows - 1) // BLOCK
            assert mixer._quota.tolist() == [want[: mixer._quota_block * BLOCK].count(i) for i in range(len(shares))]


def test_the_order_is_pinned():
    """The order of a fixed mixture, seed and rank is what checkpoints already hold: a change to the rule or its
    arithmetic (however small) breaks exact resume of every mixture run, so it must show up here."""
    import hashlib

    from llm_pipeline.data.mixing import BLOCK

    shares = {"web": 0.5, "code": 0.3, "math": 0.2, "off": 0.0}
    order = WeightedMixture({n: _Idle() for n in shares}, shares, seed=11, rank=1).source_of_rows(0, 5 * BLOCK + 100)
    assert hashlib.sha256(order.astype("<i8").tobytes()).hexdigest() == (
        "6c341161be68588ddb5c11982b41a0188d744b8118467364efdb22d54300cf0c"
    )


def test_trained_tokens_follow_the_labels_with_and_without_a_loss_mask(packed_three, tmp_path):
    """Trained tokens are derived from document ids where a source has no loss mask, and counted where it has
    one: both equal the labels that are not -100, row for row, across seq_len changes."""
    import shutil

    import numpy as np

    masked = tmp_path / "masked"
    shutil.copytree(packed_three["code"], masked)
    unmasked = PackedTokenDataset(masked, "train")
    for shard, tokens in zip(sorted(masked.glob("train/*.ds")), unmasked._tokens, strict=True):
        (np.random.default_rng(0).random(len(tokens)) < 0.7).astype(np.uint8).tofile(f"{shard}.loss")
    folders = {**packed_three, "code": masked}
    loaders = {
        n: TokenBatchLoader(PackedTokenDataset(p, "train"), seq_len=8, micro_batch_size=1, seed=0, chunk_len=32)
        for n, p in folders.items()
    }
    assert loaders["code"].dataset.has_loss_mask
    mixer = WeightedMixture(loaders, SHARES, seed=2)
    assert mixer._derived_trained == [True, False, True]
    order = WeightedMixture({n: _Idle() for n in SHARES}, SHARES, seed=2).source_of_rows(0, 2000)
    want = dict.fromkeys(SHARES, 0)
    start = 0
    for seq, micro in ((8, 5), (16, 3), (32, 8), (1, 4)):
        mixer.set_seq_len(seq, micro)
        for _ in range(20):
            labels = mixer.next_batch()["labels"]
            for row, i in zip(labels, order[start : start + micro].tolist(), strict=True):
                want[mixer.names[i]] += int((row != IGNORE_INDEX).sum())
            start += micro
    assert {n: c["trained_tokens"] for n, c in mixer.counts().items()} == want
    assert 0 < want["code"] < mixer.counts()["code"]["tokens"] * 0.8  # the mask did cut it


def test_trained_tokens_are_derived_only_where_document_ids_tell_them():
    """No loss mask and no empty document (ends strictly increasing, checked in slices): else they are counted."""
    from types import SimpleNamespace

    import numpy as np

    from llm_pipeline.data.mixing import _trained_from_documents

    def derived(ends, mask=False) -> bool:
        return _trained_from_documents(SimpleNamespace(doc_ends=np.asarray(ends, np.int64), has_loss_mask=mask))

    assert derived([3, 5, 9]) and derived([7]) and derived([])
    assert not derived([3, 5, 5, 9]) and not derived([0, 5]) and not derived([3, 5], mask=True)
    assert not _trained_from_documents(object())
    ends = np.arange(1, 2_200_000, dtype=np.int64) * 3
    assert derived(ends)
    for at in (1 << 20, (1 << 21) + 1):  # an empty document on a slice boundary and just after one
        bad = ends.copy()
        bad[at] = bad[at - 1]
        assert not derived(bad), at
