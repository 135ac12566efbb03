"""Tokenizer: special-token ids, byte-exact round trip, AutoTokenizer parity, loading errors."""

from __future__ import annotations

import pytest

from llm_pipeline.data.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    SPECIAL_TOKENS,
    load_tokenizer,
    rank_bpe_encoder,
    save_tokenizer,
    train_tokenizer,
)

from .corpus import random_doc

TRICKY = [
    "def f(x):\n    return x ** 2  # square\n",
    "  leading and trailing spaces  \n\n\t tabs\r\nwindows line",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🚀🔥 and a ZWJ family 👨‍👩‍👧",
    "control \x00\x01\x7f chars and a lone combining mark \u0301",
    "<|user|> literal special-token text inside a document <|end|>",
    "",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import random

    rng = random.Random(0)
    texts = [random_doc(rng, 200) for _ in range(50)] + TRICKY * 3 + ["import os\nprint(os.getcwd())\n"] * 20
    tok = train_tokenizer(texts, vocab_size=600, min_frequency=2)
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, d)
    return tok, d


def test_special_tokens_have_fixed_ids(trained):
    tok, _ = trained
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.get_vocab_size() == 600


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_byte_exact(trained, text):
    tok, _ = trained
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False).encode("utf-8") == text.encode("utf-8")


def test_autotokenizer_loads_with_identical_ids(trained):
    transformers = pytest.importorskip("transformers")
    tok, d = trained
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    for text in [*TRICKY, "hello world, this is the data stage."]:
        assert hf(text)["input_ids"] == tok.encode(text).ids
        assert hf.decode(hf(text)["input_ids"]) == text
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS_TOKEN, EOS_TOKEN, "<|pad|>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))


def test_load_tokenizer_from_dir_and_file(trained):
    tok, d = trained
    for where in (d, d / "tokenizer.json", str(d)):
        assert load_tokenizer(where).encode("abc def").ids == tok.encode("abc def").ids


def test_load_tokenizer_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="data tokenizer"):
        load_tokenizer(tmp_path)  # a folder without tokenizer.json
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing" / "tokenizer.json")


def test_vocab_too_small_is_refused():
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)


def test_existing_tokenizer_is_imported_by_the_tokenizer_step(trained, tmp_path):
    from llm_pipeline.data.config import DataConfig
    from llm_pipeline.data.tokenizer import build_tokenizer

    tok, d = trained
    cfg = DataConfig.model_validate({"output_dir": str(tmp_path), "tokenizer": {"path": str(d)}})
    m = build_tokenizer(cfg, show_progress=False)
    assert m["vocab_size"] == 600 and m["source"] == str(d)
    assert m["special_tokens"] == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert (cfg.tokenizer_dir / "tokenizer_config.json").is_file()
    assert load_tokenizer(cfg.tokenizer_dir).encode("abc").ids == tok.encode("abc").ids


def _fuzz_texts(tok, seed: int = 0) -> list[str]:
    """Strings that stress pre-tokenisation and merge order: random code points of every plane and every
    Unicode space, contractions, special-token text, and runs of the vocabulary's own tokens glued together."""
    import random

    rng = random.Random(seed)
    spaces = " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u2029\u202f\u205f\u3000\u200b\ufeff"

    def char() -> str:
        r = rng.random()
        if r < 0.4:
            return chr(rng.randrange(128))
        if r < 0.5:
            return rng.choice(spaces)
        c = rng.randrange(0x80, 0x10000) if r < 0.8 else rng.randrange(0x10000, 0x110000)
        return chr(c) if not 0xD800 <= c < 0xE000 else "x"  # no lone surrogates: neither encoder takes them

    texts = ["".join(char() for _ in range(rng.randint(1, 40))) for _ in range(1500)]
    texts += ["'S 'LL don't I'M", "ǅx \u0345a", "١٢٣ ⅷ 𝟙𝟚", "  \n\n  x  ", "<|user|>hi<|end|><|bos|>", "a" * 5000]
    vocab = sorted(t for t in tok.get_vocab() if t not in SPECIAL_TOKENS)
    decoded = [tok.decode([tok.token_to_id(t)]) for t in vocab]
    texts += decoded  # every token alone
    texts += ["".join(rng.choice(decoded) for _ in range(rng.randint(2, 12))) for _ in range(1500)]
    return texts + TRICKY


@pytest.mark.parametrize("which", ["trained", "stdlib"])
def test_tiktoken_encodes_the_same_ids_as_tokenizers(trained, stdlib_tokenizer_dir, which, monkeypatch):
    """pack's fast encoder (tiktoken's rank BPE, a batch split over 4 threads) on our trained byte-level BPE
    gives tokenizers' ids exactly, in order."""
    from llm_pipeline.data.pack import batch_encoder

    tok = trained[0] if which == "trained" else load_tokenizer(stdlib_tokenizer_dir)
    enc, why = rank_bpe_encoder(tok)
    assert enc is not None, why
    monkeypatch.setenv("RAYON_NUM_THREADS", "4")  # runs of documents on 4 threads, even on a 1-CPU runner
    name, fast = batch_encoder(tok, "tiktoken")
    texts = _fuzz_texts(tok)
    ours = fast(texts)
    ref = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    assert name == "tiktoken" and all(a.dtype == "uint32" for a in ours)
    assert [i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a.tolist() != b] == []
    assert enc.encode("<|user|>x<|end|>", allowed_special="all") == tok.encode("<|user|>x<|end|>").ids


def _edited(tok, edit) -> object:
    import json

    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    edit(spec)
    return Tokenizer.from_str(json.dumps(spec))


def _add_unmerged_token(spec: dict) -> None:
    spec["model"]["vocab"]["qzqz"] = len(spec["model"]["vocab"])


def _swap_two_merges(spec: dict) -> None:
    m = spec["model"]["merges"]
    m[-1], m[-2] = m[-2], m[-1]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer (NFKC)"),
        (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer is not ByteLevel"),
        (lambda s: s["model"].update(dropout=0.1), "dropout=0.1"),
        (lambda s: s["model"].update(byte_fallback=True), "byte_fallback"),
        (_add_unmerged_token, "'qzqz' is in the vocabulary without a merge"),
        (_swap_two_merges, "merges out of id order"),
    ],
    ids=["normalizer", "prefix-space", "dropout", "byte-fallback", "unmerged-token", "merge-order"],
)
def test_rank_encoder_refuses_what_it_cannot_match_and_says_why(trained, edit, reason):
    enc, why = rank_bpe_encoder(_edited(trained[0], edit))
    assert enc is None
    assert reason in why


def _toy_bpe(ignore_merges: bool):
    """Byte tokens and the merges a+b, ab+c, c+d, ab+cd (ids rising): "abcd" is a token, but BPE through the
    merges turns its bytes into ab, c, d -> abc, d. tiktoken would map a whole piece "abcd" straight to it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llm_pipeline.data.tokenizer import _byte_level_chars

    vocab = {c: i for i, c in enumerate(sorted(_byte_level_chars(), key=lambda c: _byte_level_chars()[c]))}
    merges = [("a", "b"), ("ab", "c"), ("c", "d"), ("ab", "cd")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return tok


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_rank_encoder_refuses_a_token_its_merges_do_not_rebuild(ignore_merges):
    """With ``ignore_merges`` tokenizers also maps a whole-token piece straight to it, but not the same token
    inside a longer piece ("abcde"): tiktoken would differ there, so the check runs with it off."""
    tok = _toy_bpe(ignore_merges)
    enc, why = rank_bpe_encoder(tok)
    assert enc is None
    assert "token 'abcd' does not encode back to itself through the merges (it gives ['abc', 'd'])" in why
