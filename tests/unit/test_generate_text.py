"""Text-level generation: stop strings cut completions and end rows early."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers

from llm_pipeline.model import build_model, get_preset
from llm_pipeline.model.generate import generate_text


def _char_tokenizer() -> Tokenizer:
    chars = ["<|pad|>", "<|eos|>", *[chr(c) for c in range(32, 127)]]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return tok


def test_stop_string_cuts_completion():
    tok = _char_tokenizer()
    model = build_model(get_preset("debug", vocab_size=tok.get_vocab_size()), seed=4).eval()
    prompts = ["def f(x):", "abc"]
    full = generate_text(model, tok, prompts, max_new_tokens=24, eos_token_ids=[])
    assert all(len(t) > 6 for t in full)
    stop = full[0][3:5]
    cut = generate_text(model, tok, prompts, max_new_tokens=24, eos_token_ids=[], stop_strings=[stop])
    assert cut[0] == full[0][: full[0].find(stop)]
    assert stop not in cut[1] and full[1].startswith(cut[1])


def test_prompts_start_with_bos_like_training_documents():
    from tokenizers import AddedToken

    from llm_pipeline.model.generate import encode_prompt

    tok = _char_tokenizer()
    assert encode_prompt(tok, "ab") == [tok.token_to_id("a"), tok.token_to_id("b")]  # no BOS token known
    tok.add_special_tokens([AddedToken("<|bos|>", special=True)])
    bos = tok.token_to_id("<|bos|>")
    assert encode_prompt(tok, "ab")[0] == bos and encode_prompt(tok, "<|bos|>ab").count(bos) == 1
    assert bos not in encode_prompt(tok, "ab", add_bos=False)
