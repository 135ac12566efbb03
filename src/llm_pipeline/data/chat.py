"""Chat templates and conversation records: the shared ground of the SFT and DPO data.

* :data:`CHAT_TEMPLATE` is our Jinja template. Every assistant reply and its ``<|end|>`` sit inside
  ``{% generation %}`` so that ``transformers``' ``apply_chat_template(...,
  return_assistant_tokens_mask=True)`` on an exported folder marks exactly the tokens our loss trains.
* :class:`ChatTemplate` turns a conversation into token ids plus a per-token assistant mask with the
  ``tokenizers`` library and a sandboxed ``jinja2`` (``transformers`` is not needed at run time). It
  renders any template: with generation blocks the mask comes from their character spans (the rule
  ``transformers`` applies); without them (a model imported from the hub keeps its own template) each
  assistant turn is found by rendering the conversation prefix by prefix and diffing the token ids.
  A template where neither works stops before training with :class:`ChatTemplateError`.
* :func:`parse_conversation` reads the OpenAI ``messages``, ShareGPT ``conversations``, Alpaca and
  prompt/completion layouts into one message list; a bad record raises :class:`RecordError` with
  a short reason (counted and written to the rejects file by the callers).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

# The tokenizer folder's files (template, config) belong to the tokenizer module; the names are
# re-exported here because conversations are where callers meet them.
from llm_pipeline.data.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    CHAT_TEMPLATE,
    END_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    load_tokenizer,
    read_chat_template,
    special_tokens_map,
)
from llm_pipeline.data.tokenizer import write_chat_template as write_chat_template

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ChatFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"]
Message = dict[str, str]
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot give a trustworthy loss mask; raised before any training."""


class RecordError(ValueError):
    """One unusable record: ``reason`` is a short key counted in reports, ``detail`` says what was wrong."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------------------------
# Rendering (sandboxed jinja2, with the {% generation %} tag)
# --------------------------------------------------------------------------------------------

_TRACKING: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("generation_spans", default=None)


@lru_cache(maxsize=16)
def compile_template(template: str) -> Any:
    """A sandboxed jinja2 template with the helpers chat templates on the hub expect."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationSpans(Extension):
        """``{% generation %}...{% endgeneration %}``: records the character span of its output."""

        tags = {"generation"}  # noqa: RUF012 (jinja's API)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_span", []), [], [], body).set_lineno(lineno)

        def _span(self, caller: Callable[[], str]) -> str:
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                blocks, spans = tracking
                start = sum(map(len, blocks))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationSpans, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


@contextmanager
def _track(blocks: list[str], spans: list[tuple[int, int]]) -> Iterator[None]:
    token = _TRACKING.set((blocks, spans))
    try:
        yield
    finally:
        _TRACKING.reset(token)


def render_chat(
    template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False, **variables: Any
) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the character spans of its ``{% generation %}`` blocks."""
    compiled = compile_template(template)
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    with _track(blocks, spans):
        for block in compiled.generate(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
        ):
            blocks.append(block)
    return "".join(blocks), spans


_REPLY_MARKER = "Reply7f3a9"


def end_of_turn_token(
    template: str, special_tokens: Sequence[str], variables: Mapping[str, str] | None = None
) -> str | None:
    """The special token a template writes right after an assistant reply (ours ``<|end|>``; Llama 3's
    ``<|eot_id|>``, ChatML's ``<|im_end|>``, Llama 2's ``</s>``): where chat generation must stop.

    Found by rendering a one-turn conversation, so it holds for any template; None when the template
    puts no special token there or cannot render it.
    """
    import jinja2

    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _REPLY_MARKER}]
    try:
        text = render_chat(template, convo, **dict(variables or {}))[0]
    except (jinja2.TemplateError, TypeError, ValueError):
        return None
    at = text.find(_REPLY_MARKER)
    if at < 0:
        return None
    rest = text[at + len(_REPLY_MARKER) :].lstrip()
    return next((t for t in sorted(special_tokens, key=len, reverse=True) if t and rest.startswith(t)), None)


# --------------------------------------------------------------------------------------------
# Conversations -> token ids + assistant mask
# --------------------------------------------------------------------------------------------

_PROBE: list[Message] = [
    {"role": "system", "content": "You answer questions about Python."},
    {"role": "user", "content": "What does len do?"},
    {"role": "assistant", "content": "It returns the number of items in a container."},
    {"role": "user", "content": "And abs?"},
    {"role": "assistant", "content": "It returns the absolute value of a number."},
]


class ChatTemplate:
    """A tokenizer plus its chat template: conversation -> (token ids, assistant mask).

    ``mask[i] == 1`` where token ``i`` belongs to an assistant reply (its end-of-turn token included).
    Construction probes the template on a multi-turn conversation and raises
    :class:`ChatTemplateError` if it yields no assistant token or its prefixes are not stable.
    """

    def __init__(
        self, tokenizer: Tokenizer, template: str, *, variables: Mapping[str, str] | None = None, source: str = ""
    ) -> None:
        self.tokenizer, self.template, self.source = tokenizer, template, source
        self.variables = dict(variables or {})
        self.has_generation_blocks = bool(_GENERATION_TAG.search(template))
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        self._specials = (
            re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None
        )
        self._check()

    @classmethod
    def from_dir(cls, tokenizer_dir: str | os.PathLike[str]) -> ChatTemplate:
        """The template stored with the tokenizer; ours when the folder has none but our special tokens."""
        tok = load_tokenizer(tokenizer_dir)
        d = Path(tokenizer_dir)
        d = d if d.is_dir() else d.parent
        template = read_chat_template(d)
        source = str(d)
        if template is None:
            needed = (BOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)
            if any(tok.token_to_id(t) is None for t in needed):
                raise ChatTemplateError(
                    f"{d}: no chat template (chat_template.jinja or tokenizer_config.json chat_template) and the "
                    f"tokenizer lacks our chat tokens {', '.join(needed)}; add a template to the tokenizer folder"
                )
            template, source = CHAT_TEMPLATE, "default"
        return cls(tok, template, variables=special_tokens_map(d), source=source)

    def stop_token_ids(self) -> list[int]:
        """Ids that end a generated reply: the template's end-of-turn token, then the tokenizer's EOS."""
        specials = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        names = [end_of_turn_token(self.template, specials, self.variables), self.variables.get("eos_token")]
        ids = [self.tokenizer.token_to_id(n) for n in names if n]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False) -> str:
        """The conversation as text (what ``transformers`` renders with ``tokenize=False``)."""
        return render_chat(self.template, messages, add_generation_prompt=add_generation_prompt, **self.variables)[0]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Ids of ``messages`` followed by the generation prompt (what a model sees before replying)."""
        self._check_content(messages)
        return self._ids(self._render_spans(messages, add_generation_prompt=True)[0])

    def encode(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and its assistant mask (raises :class:`RecordError`)."""
        self._check_content(messages)
        if self.has_generation_blocks:
            text, spans = self._render_spans(messages)
            enc = self.tokenizer.encode(text, add_special_tokens=False)
            return enc.ids, spans_to_mask(enc.offsets, spans)
        return self._encode_by_prefixes(messages)

    def encode_many(
        self, conversations: Sequence[Sequence[Mapping[str, Any]]], *, add_generation_prompt: bool = False
    ) -> list[tuple[list[int], list[int]] | RecordError]:
        """:meth:`encode` (or, with ``add_generation_prompt``, :meth:`encode_prompt` and a zero mask) for
        many conversations, with one batched (parallel) tokenizer call where possible."""
        if not self.has_generation_blocks and not add_generation_prompt:
            return [self._encode_or_error(c) for c in conversations]
        rendered: list[tuple[str, list[tuple[int, int]]] | RecordError] = []
        for messages in conversations:
            try:
                self._check_content(messages)
                text, spans = self._render_spans(messages, add_generation_prompt=add_generation_prompt)
                rendered.append((text, spans if self.has_generation_blocks and not add_generation_prompt else []))
            except RecordError as e:
                rendered.append(e)
        texts = [r[0] for r in rendered if not isinstance(r, RecordError)]
        encs = iter(self.tokenizer.encode_batch(texts, add_special_tokens=False))
        out: list[tuple[list[int], list[int]] | RecordError] = []
        for r in rendered:
            if isinstance(r, RecordError):
                out.append(r)
            else:
                enc = next(encs)
                out.append((enc.ids, spans_to_mask(enc.offsets, r[1])))
        return out

    def _encode_or_error(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]] | RecordError:
        try:
            return self.encode(messages)
        except RecordError as e:
            return e

    def _render_spans(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        import jinja2

        try:
            return render_chat(self.template, messages, add_generation_prompt=add_generation_prompt, **self.variables)
        except jinja2.TemplateError as e:  # e.g. raise_exception('System role not supported')
            raise RecordError("template_error", str(e)) from None

    def _check_content(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """A control token typed into a message would forge a turn boundary: refuse the record."""
        if self._specials is None:
            return
        for m in messages:
            found = self._specials.search(str(m.get("content", "")))
            if found:
                raise RecordError("special_token_in_content", f"{m.get('role')} message contains {found.group()!r}")

    def _encode_by_prefixes(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
        """Assistant turn i = ids(messages[:i+1]) minus ids(messages[:i] + generation prompt)."""
        full = self._ids(self._render_spans(messages)[0])
        mask = [0] * len(full)
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self._ids(self._render_spans(messages[:i], add_generation_prompt=True)[0])
            upto = self._ids(self._render_spans(messages[: i + 1])[0])
            if full[: len(upto)] != upto or upto[: len(before)] != before or len(upto) <= len(before):
                raise RecordError(
                    "template_prefix_mismatch",
                    f"rendering the first {i + 1} messages is not a token prefix of the whole conversation",
                )
            mask[len(before) : len(upto)] = [1] * (len(upto) - len(before))
        return full, mask

    def _check(self) -> None:
        """Probe the template before any data is read: it must mark the assistant replies and nothing else."""
        where = f"chat template from {self.source or 'the caller'}"
        probes = (_PROBE, _PROBE[1:])  # some templates refuse a system message
        errors = []
        for probe in probes:
            try:
                ids, mask = self.encode(probe)
            except RecordError as e:
                errors.append(str(e))
                continue
            trained = self.tokenizer.decode([t for t, k in zip(ids, mask, strict=True) if k], skip_special_tokens=True)
            replies = [m["content"] for m in probe if m["role"] == "assistant"]
            if not any(mask):
                raise ChatTemplateError(f"{where}: no assistant token is marked (the loss mask would be all zero)")
            prompts = [m["content"] for m in probe if m["role"] != "assistant"]
            if any(r not in trained for r in replies) or any(p in trained for p in prompts):
                raise ChatTemplateError(
                    f"{where}: the assistant mask does not cover exactly the assistant replies (marked: {trained!r})"
                )
            return
        raise ChatTemplateError(
            f"{where}: cannot find the assistant turns ({'; '.join(errors)}). A template without "
            "{% generation %} blocks must render each conversation prefix as a token prefix of the whole; "
            "add generation blocks around assistant replies or use a template that does"
        )


def spans_to_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose character range overlaps a span (``transformers``' rule; spans sorted)."""
    if not spans or not offsets:
        return [0] * len(offsets)
    tok = np.asarray(offsets, np.int64)
    span = np.asarray(spans, np.int64)
    k = np.searchsorted(span[:, 1], tok[:, 0], side="right")  # first span ending after the token starts
    inside = k < len(span)
    mask = np.zeros(len(tok), np.int8)
    mask[inside] = tok[inside, 1] > span[k[inside], 0]
    return mask.tolist()


# --------------------------------------------------------------------------------------------
# Records -> conversations
# --------------------------------------------------------------------------------------------

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}


def detect_format(record: Mapping[str, Any], columns: Mapping[str, str]) -> str:
    """The layout whose required fields the record has (``messages`` wins: UltraChat also has ``prompt``)."""
    for fmt, fields in FORMAT_FIELDS.items():
        if all(columns.get(f, f) in record for f in fields):
            return fmt
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise RecordError("unknown_format", f"no messages/conversations/instruction+output/prompt+completion (has {keys})")


def _text(value: Any, what: str) -> str:
    """A message's text: a string, or OpenAI content parts of type text (joined)."""
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        parts = [p.get("text") for p in value]
        if not all(isinstance(t, str) for t in parts):
            raise RecordError("non_string_content", f"{what}: a text part has no string 'text'")
        value = "".join(parts)
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise RecordError("non_string_content", f"{what} is {got}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError("lone_surrogate", f"{what} has an unpaired surrogate at character {e.start}") from None
    return value


def normalize_messages(
    messages: Any, *, sharegpt: bool = False, what: str = "messages", require_reply: bool = True
) -> list[Message]:
    """Validated ``[{"role", "content"}]``: known roles, string contents, no empty turn (an empty system
    prompt is dropped), trailing prompts without a reply removed, at least one assistant reply."""
    if not isinstance(messages, list) or not messages:
        got = "empty" if isinstance(messages, list) else type(messages).__name__
        raise RecordError("malformed_record", f"{what} must be a non-empty list of messages, got {got}")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    roles = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError("malformed_record", f"{what}[{i}] is {type(m).__name__}, not an object")
        missing = [k for k in (role_key, content_key) if k not in m]
        if missing:
            raise RecordError("missing_field", f"{what}[{i}] has no {' / '.join(missing)}")
        raw_role = m[role_key]
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError("unknown_role", f"{what}[{i}] has role {raw_role!r}")
        content = _text(m[content_key], f"{what}[{i}].{content_key}")
        if not content.strip():
            if role == "system":
                continue
            reason = "empty_reply" if role == "assistant" else "empty_message"
            raise RecordError(reason, f"{what}[{i}] ({role}) is empty")
        out.append({"role": role, "content": content})
    if require_reply:
        while out and out[-1]["role"] != "assistant":  # trailing prompts have no reply to learn
            out.pop()
        if not out:
            raise RecordError("no_assistant_turn", f"{what} has no assistant reply")
    return out


def check_turn_order(messages: list[Message], what: str = "conversation") -> list[Message]:
    """The one rule for a conversation's roles (the one most chat templates enforce); returns ``messages``.

    An optional system prompt comes first, then user and assistant turns alternate, starting with
    the user. Nothing is merged or reordered: a record that breaks the rule is rejected with
    ``system_not_first``, ``assistant_first`` or ``roles_not_alternating`` (counted, in the rejects file).
    """
    start = 1 if messages and messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] == expected:
            continue
        if m["role"] == "system":
            raise RecordError("system_not_first", f"{what}: turn {i + 1} is a system message; only the first may be")
        if i == start:
            raise RecordError("assistant_first", f"{what}: the first turn after any system prompt is the assistant's")
        raise RecordError("roles_not_alternating", f"{what}: turns {i} and {i + 1} are both {m['role']} turns")
    return messages


def parse_conversation(
    record: Any, fmt: ChatFormat = "auto", columns: Mapping[str, str] | None = None
) -> list[Message]:
    """One SFT record in any supported layout -> validated messages (raises :class:`RecordError`).

    ``columns`` renames fields (ours -> the dataset's), e.g. ``{"messages": "conversation"}``. An
    optional ``system`` field becomes the system prompt unless the conversation has its own. The
    roles must follow :func:`check_turn_order`.
    """
    return check_turn_order(_conversation(record, fmt, columns))


def _conversation(record: Any, fmt: ChatFormat, columns: Mapping[str, str] | None) -> list[Message]:
    cols = dict(columns or {})
    if not isinstance(record, dict):
        raise RecordError("malformed_record", f"expected an object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record, cols)  # type: ignore[assignment]

    def field(name: str, *, required: bool = True) -> Any:
        key = cols.get(name, name)
        if record.get(key) is None:
            if required:
                raise RecordError("missing_field", f"no field {key!r} ({fmt} format)")
            return None
        return record[key]

    system = field("system", required=False)
    system_msgs = [{"role": "system", "content": _text(system, "system")}] if system else []
    if fmt in ("messages", "sharegpt"):
        name = "messages" if fmt == "messages" else "conversations"
        msgs = normalize_messages(field(name), sharegpt=fmt == "sharegpt", what=cols.get(name, name))
        return msgs if msgs[0]["role"] == "system" else normalize_messages(system_msgs + msgs) if system_msgs else msgs
    if fmt == "alpaca":
        instruction = _text(field("instruction"), "instruction")
        extra = field("input", required=False)
        extra = _text(extra, "input") if extra is not None else ""
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": field("output")}]
        return normalize_messages(system_msgs + turns, what="alpaca record")
    if fmt == "prompt_completion":
        turns = [*as_messages(field("prompt"), "user"), *as_messages(field("completion"), "assistant")]
        return normalize_messages(system_msgs + turns, what="prompt/completion")
    raise ValueError(f"unknown chat format {fmt!r}")


def as_messages(value: Any, role: str) -> list[Any]:
    """A bare string becomes one ``role`` message; a list is taken as messages (TRL's conversational form)."""
    return value if isinstance(value, list) else [{"role": role, "content": value}]
