"""The package's import graph has no circle, counting imports inside functions too.

A function-level import hides a circle from Python (the import runs later, when both modules are
loaded) but not from a reader: the two modules still depend on each other and cannot be understood,
tested or moved apart. This test reads every module's source (nothing is imported) and looks for a
cycle among ``llm_pipeline`` modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llm_pipeline

PACKAGE = "llm_pipeline"
ROOT = Path(llm_pipeline.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (packages by __init__.py)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules that ``module`` imports anywhere in its source (module level or in functions).

    ``TYPE_CHECKING`` blocks count too: they are what a reader (and a type checker) follows.
    """
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            # ``from pkg import name``: the submodule ``pkg.name`` when there is one, else ``pkg`` itself.
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for t in targets:
            if not t.startswith(PACKAGE + "."):
                continue
            hit = _resolve(t, known)
            if hit is not None and hit != module:
                out.add(hit)
    return out


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted; sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_finder_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: a circle hidden in a function body, via a relative import, is found."""
    graph = {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a"}}
    assert find_cycles(graph) == [["p.a", "p.b"]]
    assert find_cycles({"p.a": {"p.b"}, "p.b": set()}) == []

    src = tmp_path / "m.py"
    src.write_text("def f():\n    from .chat import x\n    import llm_pipeline.data.tokenizer\n")
    known = {"llm_pipeline.data.m": src, "llm_pipeline.data.chat": src, "llm_pipeline.data.tokenizer": src}
    assert _imports("llm_pipeline.data.m", src, known) == {"llm_pipeline.data.chat", "llm_pipeline.data.tokenizer"}


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles among llm_pipeline modules (function-level imports included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )
