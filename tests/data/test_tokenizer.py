"""Tokenizer: special-token ids, byte-exact round trip, AutoTokenizer parity, loading errors."""

from __future__ import annotations

import pytest

from llm_pipeline.data.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    SPECIAL_TOKENS,
    load_tokenizer,
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
