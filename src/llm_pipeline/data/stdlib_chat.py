"""The embedded offline SFT and DPO data: questions and answers about this Python's standard library.

Built with ``ast`` from the same files as the pretraining corpus (:func:`~llm_pipeline.data.sources.
iter_stdlib`), with the same held-out modules as validation, so the demo runs with no network and
validation measures functions the model never saw. Everything is deterministic: the files are read in
sorted order and every choice is a hash of the function's name.

SFT: "write a function with this signature and docstring" -> its source; "what does ``m.f`` do?" ->
its docstring's first paragraph; multi-turn conversations asking both in turn, some with a system prompt.
DPO: chosen = the real answer; rejected = another function's answer, or the source with its body cut.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from llm_pipeline.data.config import SourceConfig
from llm_pipeline.data.sources import Item, iter_stdlib
from llm_pipeline.hashing import hash64

#: Packages that are GUIs, demos, encodings tables or tooling rather than library code worth teaching.
SKIPPED_PACKAGES = frozenset(
    {"idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "encodings", "venv", "__phello__"}
)
MAX_SOURCE_CHARS = 1200
MAX_SOURCE_LINES = 40
SYSTEM_PROMPT = "You are a concise assistant for Python's standard library."


@dataclass(frozen=True)
class StdlibFunction:
    """A documented public function or method of the standard library."""

    module: str  # dotted module, e.g. "json.decoder"
    name: str  # qualified name in the module, e.g. "JSONDecoder.decode"
    path: str  # file relative to the stdlib root
    lineno: int
    header: str  # the def line(s) and the docstring, as written
    summary: str  # the docstring's first paragraph
    source: str  # the whole function, dedented
    body_start: int  # line index in ``source`` where the code after the docstring starts
    split: str  # "train" or "val" (held-out module)

    @property
    def where(self) -> str:
        return f"stdlib:{self.path}:{self.lineno}"

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"


def _functions_of(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{node.name}.{sub.name}", sub


def _function(item: Item, lines: list[str], qualname: str, node: Any) -> StdlibFunction | None:
    doc = ast.get_docstring(node)
    if not doc or qualname.split(".")[-1].startswith("_") or len(node.body) < 2:
        return None
    summary = " ".join(doc.split("\n\n")[0].split())
    if len(summary) < 20 or summary.endswith(":"):
        return None
    first = node.lineno - 1
    src_lines = lines[first : node.end_lineno]
    if len(src_lines) > MAX_SOURCE_LINES:
        return None
    source = textwrap.dedent("\n".join(src_lines))
    if len(source) > MAX_SOURCE_CHARS:
        return None
    doc_end = node.body[0].end_lineno - node.lineno + 1  # lines of def + docstring
    header = "\n".join(source.split("\n")[:doc_end])
    path = str(item.meta["path"])
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    return StdlibFunction(
        module, qualname, path, node.lineno, header, summary, source, doc_end, str(item.meta.get("split", "train"))
    )


def stdlib_functions(held_out_modules: Sequence[str]) -> list[StdlibFunction]:
    """Every documented public function and method (short enough to be an answer), in file order."""
    return list(_stdlib_functions(tuple(held_out_modules)))


@lru_cache(maxsize=2)
def _stdlib_functions(held_out_modules: tuple[str, ...]) -> tuple[StdlibFunction, ...]:
    """Parsed once per process (the SFT and DPO stages of one run share it)."""
    cfg = SourceConfig(kind="stdlib", include_docs=False, held_out_modules=list(held_out_modules))
    out: list[StdlibFunction] = []
    for item in iter_stdlib(cfg):
        module = str(item.meta.get("module", ""))
        if item.text is None or module in SKIPPED_PACKAGES or module.startswith("_"):  # private: not the API
            continue
        try:
            tree = ast.parse(item.text)
        except (SyntaxError, ValueError):  # a few files are deliberately invalid (e.g. bad encodings tests)
            continue
        lines = item.text.split("\n")
        for qualname, node in _functions_of(tree):
            fn = _function(item, lines, qualname, node)
            if fn is not None:
                out.append(fn)
    return tuple(out)


def _code(text: str) -> str:
    return f"```python\n{text}\n```"


def _write_prompt(fn: StdlibFunction) -> str:
    return f"Write a Python function with this signature and docstring (from `{fn.module}`):\n\n{_code(fn.header)}"


def _ask_prompt(fn: StdlibFunction) -> str:
    return f"What does `{fn.dotted}` do?"


def _record(fn: StdlibFunction, record: dict[str, Any], kind: str) -> Item:
    return Item(fn.where, doc_id=f"{fn.dotted}:{kind}", meta={"split": fn.split}, record=record)


def stdlib_sft_records(
    functions: Sequence[StdlibFunction], kinds: Sequence[str] = ("ask", "write", "multi")
) -> Iterator[Item]:
    """SFT records in the ``messages`` layout (``Item.meta['split']`` from the held-out modules), of the
    ``kinds`` asked for (ask, write, multi: see ``ChatDataConfig.stdlib_records``)."""
    for fn in functions:
        h = hash64(fn.dotted)
        system = [{"role": "system", "content": SYSTEM_PROMPT}] if h % 3 == 0 else []
        ask = [{"role": "user", "content": _ask_prompt(fn)}, {"role": "assistant", "content": fn.summary}]
        write = [{"role": "user", "content": _write_prompt(fn)}, {"role": "assistant", "content": _code(fn.source)}]
        if "ask" in kinds:
            yield _record(fn, {"messages": system + ask}, "ask")
        if "write" in kinds:
            yield _record(fn, {"messages": system + write}, "write")
        if "multi" in kinds and h % 4 == 0:
            follow = [
                {"role": "user", "content": "Show me how it is implemented."},
                {"role": "assistant", "content": _code(fn.source)},
            ]
            yield _record(fn, {"messages": system + ask + follow}, "multi")


def _other(pools: dict[str, list[StdlibFunction]], fn: StdlibFunction, salt: str) -> StdlibFunction:
    """A deterministic different function of the same split (its answer is the wrong one)."""
    pool = pools[fn.split]
    start = hash64(salt + fn.dotted) % len(pool)
    for k in range(len(pool)):
        other = pool[(start + k) % len(pool)]
        if other.summary != fn.summary and other.source != fn.source:
            return other
    return fn


def _cut_body(fn: StdlibFunction) -> str:
    """The source with the second half of its body removed: plausible start, wrong (unfinished) code."""
    lines = fn.source.split("\n")
    body = lines[fn.body_start :]
    return "\n".join(lines[: fn.body_start] + body[: max(1, len(body) // 2)])


def stdlib_preference_records(functions: Sequence[StdlibFunction]) -> Iterator[Item]:
    """Preference records in the prompt/chosen/rejected layout (strings)."""
    pools: dict[str, list[StdlibFunction]] = {}
    for f in functions:
        pools.setdefault(f.split, []).append(f)
    for fn in functions:
        wrong = _other(pools, fn, "ask")
        if wrong is not fn:
            yield _record(fn, {"prompt": _ask_prompt(fn), "chosen": fn.summary, "rejected": wrong.summary}, "ask")
        if hash64("write" + fn.dotted) % 2:
            rejected = _cut_body(fn)
        else:
            other = _other(pools, fn, "write")
            rejected = fn.header + "\n" + "\n".join(other.source.split("\n")[other.body_start :])
        if rejected != fn.source:
            record = {"prompt": _write_prompt(fn), "chosen": _code(fn.source), "rejected": _code(rejected)}
            yield _record(fn, record, "write")


def sft_records_of(cfg: Any) -> Iterator[Item]:
    """The embedded ``stdlib`` SFT source (registered in ``data.config.EMBEDDED_CHAT_SOURCES``)."""
    return stdlib_sft_records(stdlib_functions(cfg.held_out_modules), cfg.stdlib_records)


def preference_records_of(cfg: Any) -> Iterator[Item]:
    """The embedded ``stdlib`` preference source (registered in ``data.config.EMBEDDED_CHAT_SOURCES``)."""
    return stdlib_preference_records(stdlib_functions(cfg.held_out_modules))
