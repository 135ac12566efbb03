"""Packing (deterministic, datatrove-readable) and the loader (resume, ranks, curriculum, labels)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from llm_pipeline.data.loader import IGNORE_INDEX, PackedTokenDataset, TokenBatchLoader
from llm_pipeline.data.pack import TokenShardWriter, assign_split, pack_documents
from llm_pipeline.data.tokenizer import BOS_ID, EOS_ID, save_tokenizer, train_tokenizer

from .corpus import random_doc, write_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pack")
    rng = random.Random(0)
    docs = [{"id": f"d{i:04d}", "text": random_doc(rng, rng.randint(20, 300))} for i in range(240)]
    docs[5]["metadata"] = {"split": "val"}
    for k in range(3):
        write_jsonl(tmp / "clean" / f"{k:05d}.jsonl.gz", docs[k * 80 : (k + 1) * 80])
    tok = train_tokenizer((d["text"] for d in docs), vocab_size=400)
    save_tokenizer(tok, tmp / "tok")
    return tmp, docs, tok


@pytest.fixture(scope="module")
def packed(corpus):
    tmp, _, _ = corpus
    return pack_documents(
        tmp / "clean", tmp / "packed", tmp / "tok", val_fraction=0.1, workers=1, show_progress=False
    ), tmp / "packed"


@pytest.mark.parametrize(
    "batching",
    [
        {"workers": 2},
        {"workers": 3, "batch_bytes": 1024, "batch_size": 5},
        {"workers": 2, "encoder": "tokenizers"},
        {"workers": 1, "batch_bytes": 1024, "encoder": "tokenizers"},
    ],
    ids=["2-workers", "small-batches-across-files", "tokenizers-encoder", "tokenizers-small-batches"],
)
def test_packing_is_deterministic_and_worker_count_independent(corpus, packed, batching, tmp_path, caplog):
    """Shard i holds file i's documents in input order, whatever the workers, the encode batches (which
    cross files and splits) and the encoder (tiktoken, the default here, or tokenizers)."""
    tmp, _, _ = corpus
    m1, root = packed
    with caplog.at_level("INFO", logger="llm_pipeline.data.pack"):
        m2 = pack_documents(tmp / "clean", tmp_path, tmp / "tok", val_fraction=0.1, show_progress=False, **batching)
    assert f"pack: encoding with {batching.get('encoder', 'tiktoken')}" in caplog.text
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == sorted(
        p.relative_to(tmp_path) for p in tmp_path.rglob("*")
    )
    for rel in (p.relative_to(root) for p in root.rglob("*") if p.is_file()):
        assert (root / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    assert m1 == m2


def _normalised_tokenizer(tmp, tok):
    """Our tokenizer with an NFKC normaliser: tiktoken cannot encode it the same way."""
    from tokenizers import Tokenizer, normalizers

    t = Tokenizer.from_str(tok.to_str())
    t.normalizer = normalizers.NFKC()
    save_tokenizer(t, tmp / "nfkc_tok")
    return tmp / "nfkc_tok"


def test_pack_encoder_tiktoken_refuses_a_tokenizer_it_cannot_match_by_name(corpus, tmp_path):
    tmp, _, tok = corpus
    nfkc = _normalised_tokenizer(tmp_path, tok)
    with pytest.raises(ValueError, match=r"pack.encoder=tiktoken: .*normalizer \(NFKC\).*pack.encoder: tokenizers"):
        pack_documents(tmp / "clean", tmp_path / "a", nfkc, encoder="tiktoken", show_progress=False)
    assert not list((tmp_path / "a").rglob("*.ds"))
    pack_documents(tmp / "clean", tmp_path / "b", nfkc, encoder="auto", show_progress=False)
    assert list((tmp_path / "b").rglob("*.ds"))


def test_pack_checks_tiktoken_against_tokenizers_before_writing(corpus, tmp_path, monkeypatch, caplog):
    """Ids that differ on the first batch: ``auto`` falls back to tokenizers (same shards as a tokenizers
    pack), ``tiktoken`` stops with the document named."""
    import llm_pipeline.data.pack as pack_mod

    tmp, _, _ = corpus

    class Wrong:
        special_tokens_set = frozenset()

        def encode_to_numpy(self, text, **kw):
            return np.zeros(3, np.uint32)

    monkeypatch.setattr(pack_mod, "rank_bpe_encoder", lambda tok: (Wrong(), ""))
    first = r"tiktoken's ids differ from tokenizers' in \S+00000.jsonl.gz \(document 0 of the first batch\) from token"
    with pytest.raises(ValueError, match=first):
        pack_documents(tmp / "clean", tmp_path / "a", tmp / "tok", encoder="tiktoken", show_progress=False)
    assert not list((tmp_path / "a").rglob("*.ds")) and not (tmp_path / "a" / "manifest.json").exists()
    with caplog.at_level("INFO", logger="llm_pipeline.data.pack"):
        m = pack_documents(tmp / "clean", tmp_path / "b", tmp / "tok", encoder="auto", show_progress=False)
    assert "encoding with tokenizers" in caplog.text and "pack: encoding with tiktoken" not in caplog.text
    ref = pack_documents(tmp / "clean", tmp_path / "c", tmp / "tok", encoder="tokenizers", show_progress=False)
    for p in (tmp_path / "c").rglob("*.ds"):
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "c")).read_bytes()
    assert m["splits"] == ref["splits"]


def test_packed_tokens_equal_encoding_each_document_alone(corpus, packed):
    """The batched, threaded path writes exactly ``<|bos|> encode(text) <|eos|>`` per document, in input order."""
    _, docs, tok = corpus
    _, root = packed
    expected: dict[str, list[list[int]]] = {"train": [], "val": []}
    for d in docs:
        split = assign_split(d["id"], d.get("metadata", {}), val_fraction=0.1, seed=0)
        expected[split].append([BOS_ID, *tok.encode(d["text"], add_special_tokens=False).ids, EOS_ID])
    for split, ref in expected.items():
        ds = PackedTokenDataset(root, split)
        assert [ds.document(i).tolist() for i in range(ds.num_documents)] == ref, split


def test_manifest_and_documents_round_trip(corpus, packed):
    _, docs, tok = corpus
    manifest, root = packed
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 400
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["documents"] + val["documents"] == len(docs)
    assert 0 < val["documents"] < len(docs) * 0.25
    assert train["bytes"] + val["bytes"] == sum(len(d["text"].encode()) for d in docs)
    ds = PackedTokenDataset(root, "val")
    val_texts = {tok.decode(ds.document(i)[1:-1].tolist()) for i in range(ds.num_documents)}
    assert docs[5]["text"] in val_texts  # source-given split is honoured
    ds = PackedTokenDataset(root, "train")
    first = ds.document(0)
    assert first[0] == BOS_ID and first[-1] == EOS_ID
    assert tok.decode(first[1:-1].tolist()) in {d["text"] for d in docs}
    assert ds.num_tokens == train["tokens"]


def test_datatrove_reads_our_shards(packed):
    from datatrove.utils.dataset import DatatroveFileDataset

    _, root = packed
    path = root / "train" / "00000.ds"
    ours = np.fromfile(path, dtype="<u2")
    dt = DatatroveFileDataset(str(path), seq_len=64, token_size=2)
    sample = dt[0]["input_ids"].numpy()
    assert np.array_equal(sample, ours[:65])


def _loader(root, **kw):
    kw = {"seq_len": 32, "micro_batch_size": 4, "seed": 3, "chunk_len": 128, **kw}
    return TokenBatchLoader(PackedTokenDataset(root, "train"), **kw)


def test_resume_mid_epoch_gives_identical_next_batches(packed):
    _, root = packed
    a = _loader(root)
    for _ in range(7):
        a.next_batch()
    a.set_seq_len(64, 2)  # resume must also hold after a curriculum switch
    a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(5)]
    b = _loader(root)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        for k in want:
            assert torch.equal(want[k], got[k]), k


def test_resume_across_epochs(packed):
    _, root = packed
    a = _loader(root)
    n_per_epoch = a.chunks_per_rank * (128 // 32) // 4
    for _ in range(n_per_epoch + 3):
        a.next_batch()
    assert a.epoch == 1
    b = _loader(root)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_batch()["input_ids"], b.next_batch()["input_ids"])


def test_ranks_see_disjoint_samples(packed):
    _, root = packed
    seen = []
    for rank in range(2):
        loader = _loader(root, rank=rank, world_size=2)
        rows = set()
        for _ in range(loader.chunks_per_rank):  # a whole epoch: 4 windows per chunk, 4 rows per batch
            rows |= {tuple(r) for r in loader.next_batch()["input_ids"].tolist()}
        assert loader.epoch == 0 or (loader.chunk, loader.offset) == (0, 0)
        seen.append(rows)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # and by stream position: windows of the two ranks never start at the same token
    a, b = _loader(root, rank=0, world_size=2), _loader(root, rank=1, world_size=2)
    assert not {a._next_window() for _ in range(40)} & {b._next_window() for _ in range(40)}


def test_two_sequence_lengths_read_the_same_token_stream(packed):
    _, root = packed
    short, long = _loader(root, seq_len=16, micro_batch_size=4), _loader(root, seq_len=64, micro_batch_size=1)
    s = torch.cat([short.next_batch()["input_ids"].reshape(-1) for _ in range(8)])
    l_ = torch.cat([long.next_batch()["input_ids"].reshape(-1) for _ in range(8)])
    assert torch.equal(s, l_)
    # switching mid-run continues the same stream
    mixed = _loader(root, seq_len=16, micro_batch_size=4)
    parts = [mixed.next_batch()["input_ids"].reshape(-1) for _ in range(2)]
    mixed.set_seq_len(32, 2)
    parts += [mixed.next_batch()["input_ids"].reshape(-1) for _ in range(4)]
    assert torch.equal(torch.cat(parts), s[: sum(len(p) for p in parts)])


def test_labels_and_document_ids(packed):
    _, root = packed
    loader = _loader(root)
    assert loader.tokens_per_batch == 128
    boundaries = 0
    for _ in range(20):
        batch = loader.next_batch()
        x, y, d = batch["input_ids"], batch["labels"], batch["document_ids"]
        assert x.shape == y.shape == d.shape == (4, 32) and x.dtype == y.dtype == d.dtype == torch.int64
        for row in range(4):
            assert d[row, 0] == 0 and torch.all(d[row, 1:] - d[row, :-1] >= 0)
            for t in range(31):
                if d[row, t] == d[row, t + 1]:
                    assert y[row, t] == x[row, t + 1]
                else:  # boundary: eos -> bos of the next document is never a target
                    boundaries += 1
                    assert y[row, t] == IGNORE_INDEX and x[row, t] == EOS_ID and x[row, t + 1] == BOS_ID
    assert boundaries > 0


def test_loss_mask_file_masks_labels(tmp_path):
    (tmp_path / "train").mkdir()
    w = TokenShardWriter(tmp_path / "train" / "00000.ds", dtype=np.uint16, loss_mask=True)
    for _ in range(40):
        w.write([1, 10, 11, 12, 13, 2], loss_mask=[0, 0, 0, 1, 1, 1])  # prompt 10 11 masked, answer 12 13 trained
    info = w.close()
    from llm_pipeline.data.manifest import write_json

    write_json(
        tmp_path / "manifest.json",
        {"dtype": "uint16", "splits": {"train": {"shards": [{**info, "path": "train/00000.ds"}]}}},
    )
    loader = TokenBatchLoader(PackedTokenDataset(tmp_path), seq_len=6, micro_batch_size=1, chunk_len=6)
    batch = loader.next_batch()
    x, y = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert x == [1, 10, 11, 12, 13, 2]
    assert y == [IGNORE_INDEX, IGNORE_INDEX, 12, 13, 2, IGNORE_INDEX]


def test_bad_loader_arguments(packed):
    _, root = packed
    with pytest.raises(ValueError, match="chunk_len"):
        _loader(root).set_seq_len(256, 1)
    a = _loader(root)
    with pytest.raises(ValueError, match="seed"):
        _loader(root, seed=4).load_state_dict(a.state_dict())
    with pytest.raises(FileNotFoundError, match="data pack"):
        PackedTokenDataset(root / "nope")


def test_sequential_batches_cover_every_target_once(packed):
    from llm_pipeline.data.loader import iter_sequential_batches

    _, root = packed
    ds = PackedTokenDataset(root, "val")
    all_tokens = ds.tokens(0, ds.num_tokens)
    n_targets = ds.num_tokens - ds.num_documents  # each document's bos is never a target
    total = 0
    for world in (1, 2):
        total = 0
        for rank in range(world):
            for b in iter_sequential_batches(ds, seq_len=24, micro_batch_size=3, rank=rank, world_size=world):
                y = b["labels"]
                total += int((y != IGNORE_INDEX).sum())
                assert set(y[y != IGNORE_INDEX].tolist()) <= set(all_tokens.tolist())
        assert total == n_targets


def test_domain_documents_get_their_own_splits_and_never_reach_train_or_val(corpus, tmp_path):
    """A fine-tuning domain held out of pretraining: documents marked split=domain are packed into
    `domain` / `domain_val` (hashed by id at domain_val_fraction), and train/val hold none of them."""
    src, docs, tok = corpus
    marked = [{**d, "metadata": {"split": "domain"}} if i % 4 == 0 else d for i, d in enumerate(docs)]
    write_jsonl(tmp_path / "clean" / "00000.jsonl.gz", marked)
    m = pack_documents(
        tmp_path / "clean", tmp_path / "packed", src / "tok", val_fraction=0.1, domain_val_fraction=0.25,
        show_progress=False,
    )  # fmt: skip
    domain_texts = {d["text"] for d in marked if d.get("metadata", {}).get("split") == "domain"}

    def texts(split: str) -> set[str]:
        ds = PackedTokenDataset(tmp_path / "packed", split)
        return {tok.decode(ds.document(i)[1:-1].tolist()) for i in range(ds.num_documents)}

    domain, domain_val = texts("domain"), texts("domain_val")
    assert domain | domain_val == domain_texts and not domain & domain_val
    assert 0.1 < len(domain_val) / len(domain_texts) < 0.45  # 60 documents at 0.25
    assert not (texts("train") | texts("val")) & domain_texts
    assert m["splits"]["domain"]["documents"] + m["splits"]["domain_val"]["documents"] == len(domain_texts)
    # without domain documents the manifest keeps its two splits
    m2 = pack_documents(src / "clean", tmp_path / "plain", src / "tok", val_fraction=0.1, show_progress=False)
    assert sorted(m2["splits"]) == ["train", "val"]


def test_pack_batch_bytes_is_validated():
    from pydantic import ValidationError

    from llm_pipeline.data.config import DataConfig

    assert DataConfig.model_validate({"pack": {"batch_bytes": 4 << 20}}).pack.batch_bytes == 4 << 20
    with pytest.raises(ValidationError, match=r"pack\.batch_bytes"):
        DataConfig.model_validate({"pack": {"batch_bytes": 10}})


def test_the_encoder_is_not_part_of_the_pack_fingerprint(monkeypatch):
    """Both encoders write the same bytes: switching re-packs nothing (and sets no trained stage aside)."""
    import llm_pipeline.data.pack as pack_mod
    from llm_pipeline.data.config import DataConfig

    monkeypatch.setattr(pack_mod, "read_manifest", lambda d: {"fingerprint": "clean"})
    monkeypatch.setattr(pack_mod, "file_sha256", lambda p: "tokenizer")
    fps = {
        e: pack_mod.pack_fingerprint(DataConfig.model_validate({"pack": {"encoder": e}}))
        for e in ("auto", "tiktoken", "tokenizers")
    }
    assert len(set(fps.values())) == 1
    assert pack_mod.pack_fingerprint(DataConfig.model_validate({"pack": {"val_fraction": 0.2}})) != fps["auto"]
