"""The loop's parts: train/ has no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2] / "src" / "llm_pipeline" / "train"


def _imports(path: Path) -> set[str]:
    """Every llm_pipeline.train module ``path`` imports, function-level and TYPE_CHECKING imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n.rsplit(".", 1)[-1] for n in names if n.startswith("llm_pipeline.train."))
    return found


def test_train_modules_import_no_circle():
    modules = {p.stem for p in TRAIN.glob("*.py") if p.stem != "__init__"}
    graph = {m: _imports(TRAIN / f"{m}.py") & modules - {m} for m in modules}

    def cycle_from(start: str, node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path:
                found = cycle_from(start, nxt, [*path, nxt])
                if found:
                    return found
        return None

    circles = [c for m in sorted(modules) if (c := cycle_from(m, m, [m]))]
    assert not circles, "import circles in llm_pipeline.train: " + "; ".join(" -> ".join(c) for c in circles)
