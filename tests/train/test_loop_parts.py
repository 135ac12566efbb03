"""The loop's parts: an oversubscribed CPU is named on the progress line; train/ has no import circle."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

from llm_pipeline.train.metrics import OversubscriptionWatch
from llm_pipeline.train.pretrain import run_pretraining
from llm_pipeline.train.trainer import Callback, Trainer

from .conftest import source, tiny_config

TRAIN = Path(__file__).resolve().parents[2] / "src" / "llm_pipeline" / "train"


def test_a_sudden_slowdown_on_a_busy_machine_is_named_and_costs_few_load_checks():
    calls: list[int] = []

    def load() -> tuple[float, float, float]:
        calls.append(1)
        return (8.0, 8.0, 8.0)

    watch = OversubscriptionWatch(cores=2, every=10, loadavg=load)
    for step in range(1, 11):
        assert watch.update(step, 1.0) == ""
    assert calls == []  # steady steps: no load average read at all
    note = watch.update(11, 5.0)
    assert "CPU oversubscribed" in note and "load 8.0 on 2 cores" in note
    for step in range(12, 21):  # the warning stands; the load is read again only every 10 steps
        assert watch.update(step, 5.0) == note
    assert len(calls) == 1
    watch.update(21, 5.0)
    assert len(calls) == 2


def test_a_slow_step_on_an_idle_machine_or_a_load_that_falls_is_not_flagged():
    loads = iter([1.0, 9.0, 1.0])
    watch = OversubscriptionWatch(cores=2, every=1, loadavg=lambda: (next(loads), 0.0, 0.0))
    for step in range(1, 6):
        watch.update(step, 1.0)
    assert watch.update(6, 10.0) == ""  # slow, but the machine is idle: something else (a save, a GC)
    assert watch.update(7, 10.0) != ""  # slow again with a load of 9 on 2 cores
    assert watch.update(8, 1.0) == ""  # the load fell: the warning goes


class SlowStep(Callback):
    """Makes the forward of step ``step`` take far longer than any step before (as spin-waiting threads do)."""

    def __init__(self, step: int) -> None:
        self.step, self.times, self.handle = step, [], None

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        if step + 1 == self.step:
            pause = 5 * max(self.times) + 0.05

            def slow(module, args):
                self.handle.remove()
                time.sleep(pause)

            self.handle = trainer.model.register_forward_pre_hook(slow)

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict) -> None:
        self.times.append(metrics["step_time_s"])


def test_progress_line_says_cpu_oversubscribed(tmp_path, capsys, monkeypatch):
    busy = float(4 * (os.cpu_count() or 1) + 1)
    monkeypatch.setattr(os, "getloadavg", lambda: (busy, busy, busy))
    cfg = tiny_config(tmp_path, max_steps=9, logging_steps=1)
    run_pretraining(cfg, train_source=source(cfg), callbacks=[SlowStep(8)], export=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[train]")]
    assert len(lines) == 9
    assert not any("CPU oversubscribed" in line for line in lines[:5])  # too few steps to know a normal one
    assert f"CPU oversubscribed (load {busy:.1f}" in lines[7], lines[7]
    assert "OMP_NUM_THREADS" in lines[7]


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
