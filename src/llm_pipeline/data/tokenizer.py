"""Train or load the project's byte-level BPE tokenizer.

``load_tokenizer`` is the one way the project loads a tokenizer. Special tokens sit at ids 0..6 in
the order of :data:`SPECIAL_TOKENS`; documents are packed as ``<|bos|> text <|eos|>`` (the
tokenizer itself adds nothing, so raw ``encode`` ids equal ``AutoTokenizer`` ids). The saved folder
(tokenizer.json + tokenizer_config.json + special_tokens_map.json + chat_template.jinja) loads in
``transformers.AutoTokenizer`` unchanged; this module owns those files, :mod:`.chat` renders with them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llm_pipeline.config import config_to_dict
from llm_pipeline.data.config import DataConfig
from llm_pipeline.data.manifest import MANIFEST, read_manifest, write_json
from llm_pipeline.hashing import file_sha256, stable_hash

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    END_TOKEN,
)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"

#: Our chat format: ``<|bos|>`` then ``<|role|>content<|end|>`` per message, no whitespace between
#: markers (every turn boundary is a special token, so rendering then tokenising equals tokenising
#: each piece on its own). Generation (``add_generation_prompt``) starts after ``<|assistant|>``; the
#: reply and its ``<|end|>`` are the ``{% generation %}`` block, i.e. the trained tokens.
CHAT_TEMPLATE = """<|bos|>
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|assistant|>' }}
        {%- generation %}
            {{- message['content'] + '<|end|>' }}
        {%- endgeneration %}
    {%- elif message['role'] in ['system', 'user'] %}
        {{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}
    {%- else %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>' }}
{%- endif %}
"""


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 50304, min_frequency: int = 2, show_progress: bool = False
) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation, all 256 bytes in the alphabet) with our special tokens."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} too small: needs >= {len(SPECIAL_TOKENS) + 256} (specials + bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    _check_special_ids(tok, "trained tokenizer")
    return tok


def _check_special_ids(tok: Tokenizer, where: str) -> None:
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise ValueError(f"{where}: special token {t} must have id {i}, has {tok.token_to_id(t)}")


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike[str], *, model_max_length: int = 4096) -> Path:
    """Write tokenizer.json plus the HF config files that make AutoTokenizer load it as-is.

    A tokenizer with our chat tokens also gets our chat template, so every model exported from it
    chats through ``transformers``' ``apply_chat_template`` in the format SFT trains.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / TOKENIZER_FILE))
    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN],
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special_map,
    }
    (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS):
        write_chat_template(d)
    return d


# --------------------------------------------------------------------------------------------
# Template files (the chat template stored with the tokenizer)
# --------------------------------------------------------------------------------------------


def read_chat_template(directory: str | os.PathLike[str]) -> str | None:
    """The folder's chat template as ``transformers`` picks it: ``chat_template.jinja`` first, then the
    ``chat_template`` of ``tokenizer_config.json`` (a string, or the ``default`` of a named list)."""
    d = Path(directory)
    if (d / CHAT_TEMPLATE_FILE).is_file():
        return (d / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    cfg_file = d / TOKENIZER_CONFIG
    if not cfg_file.is_file():
        return None
    template = json.loads(cfg_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # legacy named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def write_chat_template(directory: str | os.PathLike[str], template: str = CHAT_TEMPLATE) -> Path:
    """Store ``template`` as ``chat_template.jinja`` and in ``tokenizer_config.json`` (older readers)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    cfg_file = d / TOKENIZER_CONFIG
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    cfg["chat_template"] = template
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return d / CHAT_TEMPLATE_FILE


def special_tokens_map(directory: str | os.PathLike[str]) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ... of ``tokenizer_config.json``: the names templates render."""
    cfg_file = Path(directory) / TOKENIZER_CONFIG
    if not cfg_file.is_file():
        return {}
    raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"):
        val = raw.get(key)
        val = val.get("content") if isinstance(val, dict) else val
        if isinstance(val, str):
            out[key] = val
    return out


def load_tokenizer(path_or_dir: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer from a folder holding tokenizer.json, a tokenizer.json file, or a hub name."""
    p = Path(path_or_dir)
    if p.is_dir():
        f = p / TOKENIZER_FILE
        if not f.is_file():
            raise FileNotFoundError(f"{p} has no {TOKENIZER_FILE}: run `llm-pipeline data tokenizer` first")
        return _tokenizer_from_file(f)
    if p.is_file():
        return _tokenizer_from_file(p)
    if p.is_absolute() or str(path_or_dir).startswith(".") or str(path_or_dir).count("/") > 1:
        raise FileNotFoundError(f"tokenizer not found: {p}")
    try:  # a hub name such as "gpt2" or "org/name" (needs network or the HF cache)
        return Tokenizer.from_pretrained(str(path_or_dir))
    except Exception as e:  # the hub client raises many types; the user needs the name and cause
        msg = f"tokenizer {path_or_dir!r}: not a local path and not loadable from the hub: {e}"
        raise FileNotFoundError(msg) from e


def _tokenizer_from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception for a damaged or foreign file
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None


# ``pre_tokenizers.ByteLevel(use_regex=True)``'s split: GPT-2's pre-tokenisation pattern.
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_level_chars() -> dict[str, int]:
    """ByteLevel's printable stand-in for each byte (GPT-2's table), mapped back to the byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in chars.values()]
    chars.update({chr(256 + k): b for k, b in enumerate(others)})
    return chars


def rank_bpe_encoder(tok: Tokenizer) -> tuple[Any, str]:
    """``tok`` as a tiktoken ``Encoding`` that computes the same ids, or ``(None, why not)``.

    tiktoken encodes 2-3x faster than ``encode_batch_fast`` (docs/benchmarks.md), but it runs rank BPE
    (merge the adjacent pair whose concatenation has the lowest id) where ``tokenizers`` runs merge-list
    BPE (merge the adjacent pair listed first). The two agree when pre-tokenisation is ByteLevel's GPT-2
    regex with no normaliser, each merge makes a new token with a higher id than the merge before it,
    every multi-byte token comes from a merge, and each token's own bytes encode back to it. A tokenizer
    :func:`train_tokenizer` made meets all of these; anything else is refused here, with the reason.
    Added tokens are split out of the text as ``tokenizers`` does (pass them as ``allowed_special``).
    """
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed (pip install tiktoken)"
    spec = json.loads(tok.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return None, f"the model is {model.get('type')}, not BPE"
    if spec.get("normalizer") is not None:
        return None, f"it has a normalizer ({spec['normalizer'].get('type')})"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return None, "its pre-tokenizer is not ByteLevel(add_prefix_space=False, use_regex=True)"
    for key in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return None, f"its BPE sets {key}={model[key]!r}"
    if model.get("byte_fallback"):
        return None, "its BPE uses byte_fallback"
    if getattr(tok, "encode_special_tokens", False):
        return None, "it encodes special tokens as text (encode_special_tokens=True)"
    vocab: dict[str, int] = model["vocab"]
    chars = _byte_level_chars()
    if any(c not in vocab for c in chars):
        return None, "its vocabulary lacks some of the 256 byte tokens"
    added = spec.get("added_tokens") or []
    for a in added:
        if not a.get("special") or a.get("normalized") or a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            return None, f"added token {a.get('content')!r} is not a plain special token"
    specials = {a["content"]: a["id"] for a in added}
    last, made = -1, set()
    for m in model.get("merges") or []:
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        token = left + right
        tid = vocab.get(token)
        if tid is None or token in specials:
            what = "not in the vocabulary" if tid is None else "a special token"
            return None, f"merge {left!r} + {right!r} makes {token!r}, which is {what}"
        if tid <= last:
            why = f"makes id {tid}, not above the previous merge's {last}: merges out of id order"
            return None, f"merge {left!r} + {right!r} {why}"
        last = tid
        made.add(token)
    ranks: dict[bytes, int] = {}
    for token, tid in vocab.items():
        if token in specials:
            continue
        if len(token) > 1 and token not in made:
            return None, f"token {token!r} is in the vocabulary without a merge that makes it"
        try:
            ranks[bytes(chars[c] for c in token)] = tid
        except KeyError:
            return None, f"token {token!r} is not byte-level"
    # Each token's own bytes must BPE back to it through the merges alone: tiktoken maps a piece that is a
    # whole token straight to it, as tokenizers does only with ``ignore_merges`` (so check without it).
    merges_only = tok.model
    if model.get("ignore_merges"):
        merges_only = Tokenizer.from_str(json.dumps({**spec, "model": {**model, "ignore_merges": False}})).model
    for t in sorted(made):
        got = [x.value for x in merges_only.tokenize(t)]
        if got != [t]:
            return None, f"token {t!r} does not encode back to itself through the merges (it gives {got})"
    enc = tiktoken.Encoding(
        "llm_pipeline_bpe", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    return enc, ""


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of our special tokens in ``tok`` (missing ones are omitted)."""
    return {t: i for t in SPECIAL_TOKENS if (i := tok.token_to_id(t)) is not None}


def iter_texts_capped(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """Yield texts until ``max_bytes`` UTF-8 bytes have been yielded (the cap bounds training time)."""
    total = 0
    for t in texts:
        yield t
        total += len(t.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            return


def build_tokenizer(cfg: DataConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """The ``data tokenizer`` step: train on the cleaned documents (or import ``tokenizer.path``) into
    ``<output_dir>/tokenizer`` with a manifest (vocab size, sha256, special-token ids)."""
    from llm_pipeline.data.sources import iter_jsonl_documents

    t = cfg.tokenizer
    out = cfg.tokenizer_dir
    fp = tokenizer_fingerprint(cfg)
    if t.path:
        src = Path(t.path)
        if src.is_dir() and (src / "tokenizer_config.json").is_file():  # an HF tokenizer folder: copy it as-is
            tok = load_tokenizer(src)
            out.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja"):
                    shutil.copy2(f, out / f.name)
        else:
            tok = load_tokenizer(t.path)
            save_tokenizer(tok, out)
        log.info("tokenizer: imported %s (vocab %d)", t.path, tok.get_vocab_size())
    else:
        manifest = read_manifest(cfg.clean_dir)
        texts = iter_texts_capped(
            (d["text"] for d in iter_jsonl_documents(cfg.clean_dir / "output")), t.max_train_bytes
        )
        tok = train_tokenizer(
            texts, vocab_size=t.vocab_size, min_frequency=t.min_frequency, show_progress=show_progress
        )
        save_tokenizer(tok, out)
        log.info(
            "tokenizer: trained byte-level BPE, vocab %d, on %d cleaned documents",
            tok.get_vocab_size(),
            manifest["documents_kept"],
        )
    result = {
        "step": "tokenizer",
        "fingerprint": fp,
        "vocab_size": tok.get_vocab_size(),
        "tokenizer_sha256": file_sha256(out / TOKENIZER_FILE),
        "special_tokens": special_token_ids(tok),
        "source": t.path or "trained",
        "config": config_to_dict(t),
    }
    write_json(out / MANIFEST, result)
    return result


def tokenizer_fingerprint(cfg: DataConfig) -> str:
    t = cfg.tokenizer
    upstream = read_manifest(cfg.clean_dir)["fingerprint"] if t.path is None else t.path
    return stable_hash("tokenizer", config_to_dict(t), upstream)
