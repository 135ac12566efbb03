"""The run report: built after the fact from the files a run leaves, never from logging calls in training.

``write_report(run_dir)`` reads

    pipeline.resolved.yaml            the stages planned, in order
    summary.json                      per stage: kind, steps, tokens_seen, eval, gate, wall_s, config_hash
    logs/<stage>/metrics.jsonl        {"step", "split": "train"|"eval", "time", "loss", "lr", "tokens_per_s", "mfu"...}
    evals/<stage>_final/results.json  flat "metrics" ("perplexity.perplexity", "stage.loss"...) and "host"
    checkpoints/<stage>/config.yaml   each stage's resolved config (hashed)
    promoted/<stage>.json             the gate's promotion record

and writes ``report/summary.md`` (a card: one stage x metric table of the eval suite with deltas against
the previous stage, each stage's own held-out metrics before and after it, then per-stage gate verdicts,
tokens, wall-clock and config hashes, the environment, and what is missing)
and ``report/report.html`` (the same card and the plots as embedded PNGs: loss and learning rate, tokens/s
and MFU per stage, evaluation metrics across stages; one file, no external resources). Every piece may be
missing (a stage without evals, a run stopped halfway): the card says what is absent instead of failing.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llm_pipeline.gates import flatten_metrics
from llm_pipeline.hashing import file_sha256
from llm_pipeline.records import StageRecord, Summary, Verdict, load_summary, read_promotion

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    """What the run left for one stage (or for ``init``, the evaluated starting model)."""

    name: str
    kind: str = "-"
    state: str = "not run"  # completed / trained, not evaluated / stopped at step N / not run / ...
    metrics: dict[str, float] = field(default_factory=dict)
    train: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> metrics line (last one wins)
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    steps: int | None = None
    tokens: float | None = None
    wall_s: float | None = None
    wall_estimated: bool = False
    gate: Verdict | None = None
    promoted: bool = False
    config_hash: str | None = None
    host: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    mixture: dict[str, float] = field(default_factory=dict)  # summary.json stats "mix/<source>/<count>"
    statuses: dict[str, str] = field(default_factory=dict)  # eval task -> ok / unavailable / timed_out / error
    expect: dict[str, str] = field(default_factory=dict)  # eval task -> what it is expected to show (eval config)

    def mean(self, key: str) -> float | None:
        vals = [m[key] for m in self.train.values() if isinstance(m.get(key), int | float) and math.isfinite(m[key])]
        return sum(vals) / len(vals) if vals else None


@dataclass
class RunReport:
    run_dir: Path
    stages: list[StageReport]
    status: str
    missing: list[str]
    metric_names: list[str]
    environment: dict[str, Any]


def _read_json(path: Path, missing: list[str], what: str) -> Any:
    if not path.is_file():
        missing.append(f"{what}: no {path}")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        missing.append(f"{what}: {path} is unreadable ({e})")
        return None


def read_metrics_log(path: Path) -> tuple[dict[int, dict], dict[int, dict], int]:
    """(train lines by step, eval lines by step, unreadable lines); a resumed run re-logs steps: the last wins."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    bad = 0
    if not path.is_file():
        return train, evals, bad
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            bad += 1  # a line cut short by a crash
            continue
        (evals if rec.get("split") == "eval" else train)[step] = rec
    return dict(sorted(train.items())), dict(sorted(evals.items())), bad


def _numeric(flat: dict[str, Any]) -> dict[str, float]:
    """The numbers of a results mapping; NaN and infinities are kept (the card shows them as they are)."""
    return {k: float(v) for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _read_results(s: StageReport, res: dict[str, Any]) -> None:
    """A stage's numbers, each eval's status and the eval config's ``expect`` labels from its results.json."""
    flat = flatten_metrics(res.get("metrics") or {})
    s.metrics, s.host = _numeric(flat), res.get("host")
    s.statuses = {k[: -len(".status")]: v for k, v in flat.items() if k.endswith(".status") and isinstance(v, str)}
    expect = (res.get("config") or {}).get("expect") if isinstance(res.get("config"), dict) else None
    s.expect = {str(k): str(v) for k, v in expect.items()} if isinstance(expect, dict) else {}


def _config_hash(run_dir: Path, stage: str) -> str | None:
    """sha256 of the stage's resolved config.yaml (the one its output folder holds, else its newest checkpoint's)."""
    folder = run_dir / "checkpoints" / stage
    newest_first = sorted(
        folder.glob("checkpoint-*/config.yaml"), key=lambda p: int(p.parent.name.split("-")[1]), reverse=True
    )
    candidates = [folder / "config.yaml", *newest_first]
    for p in candidates:
        if p.is_file():
            return file_sha256(p)
    return None


def collect(run_dir: str | Path) -> RunReport:
    """Everything the report shows, from the run folder's files (see the module docstring)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    missing: list[str] = []
    if not (run_dir / "summary.json").is_file():
        missing.append(f"summary: no {run_dir / 'summary.json'}")
    summary = load_summary(run_dir)  # a file that is no summary (a list...) raises RecordError, naming it
    done = summary.stages
    planned: list[tuple[str, str]] = []
    chained: list[str] = []  # stages that start from the previous stage's promoted model
    try:
        resolved = yaml.safe_load((run_dir / "pipeline.resolved.yaml").read_text(encoding="utf-8")) or {}
        entries = [s for s in resolved.get("stages") or [] if isinstance(s, dict)]
        planned = [(s["name"], s.get("kind", "-")) for s in entries]
        chained = [s["name"] for s in entries if s.get("start_from", "previous") == "previous"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        missing.append(f"plan: no readable {run_dir / 'pipeline.resolved.yaml'}; stages are taken from what exists")
    names = [n for n, _ in planned] or list(done) or sorted(p.name for p in (run_dir / "logs").glob("*") if p.is_dir())
    kinds = dict(planned)
    stages: list[StageReport] = []
    if (run_dir / "evals" / "init_final").is_dir() or summary.init_eval is not None:
        stages.append(_init_stage(run_dir, summary, missing))
    blocked_by: str | None = None
    for name in names:
        rec = done.get(name)
        s = StageReport(name, kind=(rec.kind if rec else None) or kinds.get(name, "-"))
        _fill_stage(s, run_dir, rec, missing)
        if blocked_by and s.state == "not run":
            s.state = f"not run: the {blocked_by} gate blocked promotion"
        if s.gate is not None and not s.gate.passed:
            blocked_by = name
        stages.append(s)
    _note_lineage(stages, run_dir, names, chained)
    metric_names = _metric_names(stages, run_dir)
    env = next((s.host for s in reversed(stages) if s.host), None) or {}  # the newest evaluation's
    if not env:
        missing.append("environment: no results.json records its host (python, torch, device)")
    return RunReport(run_dir, stages, _status(stages, summary), missing, metric_names, env)


def _note_lineage(stages: list[StageReport], run_dir: Path, names: list[str], chained: list[str]) -> None:
    """A promoted stage trained from a model its previous stage no longer has promoted (that stage was
    retrained and promoted since) is still promoted, but says so: it is not built on the current model."""
    by_name = {s.name: s for s in stages}
    for before, name in itertools.pairwise(names):
        if name not in chained or name not in by_name:
            continue
        mine, theirs = read_promotion(run_dir, name)[0], read_promotion(run_dir, before)[0]
        if (
            mine
            and theirs
            and mine.start_fingerprint
            and theirs.fingerprint
            and mine.start_fingerprint != theirs.fingerprint
        ):
            by_name[name].notes.append(
                f"promoted, but trained from an earlier {before} model than the one promoted now "
                f"(run the pipeline with --from {name} to train it on the current one)"
            )


def _init_stage(run_dir: Path, summary: Summary, missing: list[str]) -> StageReport:
    s = StageReport("init", kind="start model", state="evaluated")
    res = _read_json(run_dir / "evals" / "init_final" / "results.json", missing, "init")
    if isinstance(res, dict):
        _read_results(s, res)
    elif summary.init_eval:
        s.metrics = _numeric(flatten_metrics(summary.init_eval))
    return s


def _fill_stage(s: StageReport, run_dir: Path, rec: StageRecord | None, missing: list[str]) -> None:
    known = rec is not None
    rec = rec or StageRecord()
    s.train, s.evals, bad = read_metrics_log(run_dir / "logs" / s.name / "metrics.jsonl")
    if bad:
        s.notes.append(f"{bad} unreadable line(s) in logs/{s.name}/metrics.jsonl skipped")
    # The evaluation of the export the record describes: the promoted one, or a candidate its gate blocked.
    eval_dir = Path(rec.eval_dir) if rec.eval_dir else run_dir / "evals" / f"{s.name}_final"
    if not eval_dir.is_dir() and (run_dir / "evals" / eval_dir.name).is_dir():
        eval_dir = run_dir / "evals" / eval_dir.name  # a run folder moved since
    results_path = eval_dir / "results.json"
    res = None
    if results_path.is_file():
        res = _read_json(results_path, missing, s.name)
    if isinstance(res, dict):
        _read_results(s, res)
    elif isinstance(rec.eval, dict):
        s.metrics = _numeric(flatten_metrics(rec.eval))
    last = s.train[max(s.train)] if s.train else {}
    s.steps = rec.steps if rec.steps is not None else (max(s.train) if s.train else None)
    tokens = rec.tokens_seen if rec.tokens_seen is not None else last.get("tokens_seen")
    s.tokens = float(tokens) if isinstance(tokens, int | float) else None
    if rec.wall_s is not None:
        s.wall_s = float(rec.wall_s)
    elif s.train or s.evals:  # first to last line: includes any time the run spent stopped
        times = [m["time"] for m in (*s.train.values(), *s.evals.values()) if isinstance(m.get("time"), int | float)]
        if len(times) > 1:
            s.wall_s, s.wall_estimated = max(times) - min(times), True
    s.mixture = {k: float(v) for k, v in (rec.stats or {}).items() if k.startswith("mix/")}
    s.gate = rec.gate
    pointer, problem = read_promotion(run_dir, s.name)
    s.promoted = pointer is not None and problem is None
    if problem:
        s.notes.append(f"promoted/{s.name}.json no longer holds: {problem}")
    if rec.final_dir and Path(rec.final_dir).name.endswith("_candidate") and rec.status == "blocked" and pointer:
        s.notes.append(
            f"the retrained candidate ({rec.final_dir}) was blocked by its gate; the promoted model is still "
            f"{pointer.model_dir}"
        )
    s.config_hash = _config_hash(run_dir, s.name) or rec.config_hash
    status = rec.status  # the pipeline's record: trained / evaluated / promoted / blocked / preempted...
    at = f" at step {max(s.train)}" if s.train else ""
    loss = last.get("loss")
    if status == "diverged" or (
        status != "promoted" and isinstance(loss, float) and not math.isfinite(loss) and not known
    ):
        step = rec.steps if rec.steps is not None else (max(s.train) if s.train else None)
        where = f" at step {step}" if step is not None else ""
        s.state = f"DIVERGED{where}: non-finite loss"  # not the last finite loss, which would look like a result
        missing.append(
            f"{s.name}: DIVERGED{where}: its loss became non-finite; lower the learning rate or raise "
            "max_grad_norm, then run again to resume from the saved checkpoint"
        )
    elif status in ("evaluated", "promoted", "blocked") or (known and status is None and res is not None):
        s.state = "completed"
    elif status == "trained" or (known and status is None and rec.final_dir):
        s.state = "trained, not evaluated"
        if not s.metrics:
            missing.append(f"{s.name}: no evaluation results ({results_path})")
    elif known:
        s.state = f"stopped ({status or 'unfinished'}){at}"
        missing.append(f"{s.name}: did not finish ({status or 'no final model'}){at}; run again to resume")
    elif (run_dir / "checkpoints" / f"{s.name}_final" / "config.json").is_file():
        s.state = "trained (export written), not in summary.json"
        missing.append(f"{s.name}: exported but not recorded in summary.json (the run stopped after it)")
    elif s.train:
        from llm_pipeline.checkpoint.lock import live_owner

        owner = live_owner(run_dir / "checkpoints" / s.name)
        s.state = f"running (pid {owner.pid})" if owner else f"stopped{at}"
        missing.append(f"{s.name}: did not finish; last logged step {max(s.train)}")
    else:
        missing.append(f"{s.name}: not run")


def _status(stages: list[StageReport], summary: Summary) -> str:
    blocked = [s.name for s in stages if s.gate is not None and not s.gate.passed]
    if blocked:
        return f"stopped: the {blocked[0]} gate blocked promotion"
    diverged = [s for s in stages if s.state.startswith("DIVERGED")]
    if diverged:
        return f"stopped: {diverged[0].name} {diverged[0].state}"
    unfinished = [s for s in stages if s.name != "init" and s.state != "completed"]
    if not unfinished and summary.stages:
        return "completed"
    if unfinished:
        return f"incomplete: {unfinished[0].name} {unfinished[0].state}"
    return "incomplete: no summary.json (stopped before its first stage finished, or still running)"


def _gated(stages: list[StageReport]) -> list[str]:
    return [r.metric for s in stages if s.gate for r in s.gate.results]


def _metric_names(stages: list[StageReport], run_dir: Path) -> list[str]:
    """The eval suite's metrics, compared across stages. A stage's own held-out metrics (``stage.*``) are
    measured on that stage's data (SFT replies, DPO pairs, a LoRA domain), so they get their own table."""
    from llm_pipeline.eval.task import EVAL_TASKS, make_task

    present = {k for s in stages for k in s.metrics if not k.startswith("stage.")}
    shown: list[str] = []  # each registered task's shown metrics (its headline; lm-eval: suites, then tasks)
    for name in EVAL_TASKS:
        values = {k[len(name) + 1 :]: v for s in stages for k, v in s.metrics.items() if k.startswith(name + ".")}
        task = make_task(name)
        if values:
            shown += [f"{name}.{m}" for m in task.shown(values)]
        elif task.headline and any(name in s.statuses for s in stages):  # never scored: its row says why
            shown.append(f"{name}.{task.headline[0]}")
            present.add(shown[-1])
    return list(dict.fromkeys([*(m for m in shown if m in present), *(m for m in _gated(stages) if m in present)]))


def _stage_headline(kind: str) -> tuple[str, ...]:
    """The stage kind's own held-out metrics (its ``report_metrics``); none for a kind no longer registered."""
    from llm_pipeline.train.kinds import STAGE_KINDS

    if kind not in STAGE_KINDS:
        return ("loss",)
    from llm_pipeline.train.stage import stage_class

    return stage_class(kind).report_metrics


def _own_metrics(s: StageReport, gated: list[str]) -> str:
    """``key start -> end`` for the stage's headline held-out metrics (and any a gate reads)."""
    from_gates = (m.removeprefix("stage.") for m in gated if m.startswith("stage.") and ".start." not in m)
    keys = [*_stage_headline(s.kind), *from_gates]
    parts = []
    for key in dict.fromkeys(keys):
        end = s.metrics.get(f"stage.{key}")
        if end is None:
            continue
        start = s.metrics.get(f"stage.start.{key}")
        parts.append(f"{key} {fmt(end)}" if start is None else f"{key} {fmt(start)} → {fmt(end)}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------


def fmt(v: float | None) -> str:
    """4 significant digits: the card's one number format (the tests read it back the same way)."""
    if v is None:
        return "-"
    if math.isnan(v):
        return "NaN"  # a metric that was computed and is not a number: not the same as one that is missing
    return f"{v:.4g}"


def fmt_delta(v: float, prev: float | None) -> str:
    if prev is None or not math.isfinite(v) or not math.isfinite(prev):
        return fmt(v)
    d = v - prev
    return f"{fmt(v)} ({'+' if d >= 0 else '−'}{fmt(abs(d))})"


def _duration(s: float | None, estimated: bool = False) -> str:
    if s is None:
        return "-"
    h, rem = divmod(round(s), 3600)
    text = f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"
    return ("≈" if estimated else "") + text


def _gate_text(s: StageReport) -> str:
    if s.gate is None:
        return "-"
    if s.gate.passed:
        return "passed" + (" (promoted)" if s.promoted else "")
    failed = [f"{r.metric}: {r.reason}" for r in s.gate.failed()]
    return "BLOCKED: " + "; ".join(failed)


def own_table(rep: RunReport) -> tuple[list[str], list[list[str]]]:
    """Each stage's held-out metrics on its own data, before its first step and after its last."""
    gated = _gated(rep.stages)
    rows = [[s.name, text] for s in rep.stages if (text := _own_metrics(s, gated))]
    return ["stage", "held-out metrics on the stage's own data (start → end)"], rows


def tables(rep: RunReport) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(metric header, rows; stage header, rows): the card's two main tables, shared by Markdown and HTML.

    The first has one column per stage and one row per metric, each cell with its change against the last
    stage before it that has the metric; a suite's average is a row like any metric. A task a stage could
    not run shows its status (``unavailable``), never a number; a task the eval config labels (``expect``,
    e.g. ``flat: model too small``) carries the label in its row's name."""
    mhead = ["metric", *(s.name for s in rep.stages)]
    mrows = []
    for m in rep.metric_names:
        task = m.split(".", 1)[0]
        label = next((s.expect[task] for s in reversed(rep.stages) if task in s.expect), None)
        row = [f"{m} ({label})" if label else m]
        prev: float | None = None
        for s in rep.stages:
            if m in s.metrics:
                row.append(fmt_delta(s.metrics[m], prev))
                prev = s.metrics[m]
            else:
                status = s.statuses.get(task)
                row.append(status.replace("_", " ") if status and status not in ("ok", "partial") else "-")
        mrows.append(row)
    shead = ["stage", "kind", "state", "steps", "tokens", "wall-clock", "tokens/s", "MFU", "gate", "config sha256"]
    srows = []
    for s in rep.stages:
        mfu = s.mean("mfu")
        srows.append([
            s.name, s.kind, s.state, "-" if s.steps is None else str(s.steps),
            "-" if s.tokens is None else f"{s.tokens:,.0f}", _duration(s.wall_s, s.wall_estimated),
            fmt(s.mean("tokens_per_s")), "-" if mfu is None else f"{100 * mfu:.1f}%", _gate_text(s),
            (s.config_hash or "-")[:12],
        ])  # fmt: skip
    return mhead, mrows, shead, srows


def mixture_table(rep: RunReport) -> tuple[list[str], list[list[str]]]:
    """Each mixture source of each stage: its weight against the share it got, what was drawn, its passes."""
    rows = []
    for s in rep.stages:
        # by weight, then name: a set's order of equal weights changes with the interpreter's hash seed
        names = sorted({k.split("/")[1] for k in s.mixture}, key=lambda n: (-s.mixture.get(f"mix/{n}/weight", 0), n))
        for n in names:

            def get(key: str, name: str = n, stage: StageReport = s) -> float | None:
                return stage.mixture.get(f"mix/{name}/{key}")

            weight, share = get("weight"), get("share")
            rows.append([
                s.name, n, "-" if weight is None else f"{weight:.3f}", "-" if share is None else f"{share:.3f}",
                *("-" if (v := get(k)) is None else f"{v:,.0f}" for k in ("tokens", "examples", "passes")),
            ])  # fmt: skip
    return ["stage", "source", "weight", "realised share", "tokens", "examples", "passes"], rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def cell(x: str) -> str:
        return x.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, head)) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


Table = tuple[list[str], list[list[str]]]


def card(rep: RunReport) -> tuple[list[tuple[str, Table | str]], str, list[str]]:
    """The card's sections (title, then a table or a line saying it is empty), the environment line and
    the notes on what is missing: one content, rendered as Markdown and as HTML."""
    mhead, mrows, shead, srows = tables(rep)
    sections: list[tuple[str, Table | str]] = [
        ("Evaluation by stage (change against the stage before)",
         (mhead, mrows) if rep.metric_names else "No evaluation results in this run."),
    ]  # fmt: skip
    if (own := own_table(rep))[1]:
        sections.append(("Each stage on its own held-out data", own))
    if (mix := mixture_table(rep))[1]:
        sections.append(("Data mixtures (configured weight against the realised share)", mix))
    sections.append(("Stages", (shead, srows)))
    env = rep.environment
    labels = {
        "git_commit": "git commit",
        "python": "python",
        "torch": "torch",
        "device": "device",
        "lm_eval": "lm-eval",
    }
    env_text = ", ".join(f"{label} {env[k]}" for k, label in labels.items() if env.get(k)) or "unknown"
    notes = rep.missing + [f"{s.name}: {n}" for s in rep.stages for n in s.notes]
    return sections, env_text, notes


def markdown_card(rep: RunReport) -> str:
    sections, env_text, notes = card(rep)
    parts = [f"# Run report: {rep.run_dir}", f"**Status:** {rep.status}", f"**Environment:** {env_text}"]
    for title, content in sections:
        parts += [f"## {title}", f"_{content}_" if isinstance(content, str) else _md_table(*content)]
    if notes:
        parts += ["## Missing or incomplete", "\n".join(f"- {n}" for n in notes)]
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Plots and the HTML page
# --------------------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _series(points: dict[int, dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    xs = [s for s, m in points.items() if isinstance(m.get(key), int | float) and math.isfinite(m[key])]
    return xs, [points[s][key] for s in xs]


def plots(rep: RunReport) -> dict[str, str]:
    """Title -> base64 PNG; a figure with nothing to draw is left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: the report has no plots (pip install matplotlib)")
        return {}
    trained = [s for s in rep.stages if s.train or s.evals]
    out: dict[str, str] = {}
    panels = [("Loss", [("train", "loss"), ("eval", "loss")]), ("Learning rate", [("train", "lr")]),
              ("Throughput (tokens/s)", [("train", "tokens_per_s")]), ("MFU", [("train", "mfu")])]  # fmt: skip
    for title, keys in panels:
        drawn = [s for s in trained if any(_series(s.train if sp == "train" else s.evals, k)[0] for sp, k in keys)]
        if not drawn:
            continue
        fig, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn), 3.0), squeeze=False)
        for ax, s in zip(axes[0], drawn, strict=True):
            for split, key in keys:
                xs, ys = _series(s.train if split == "train" else s.evals, key)
                if xs:
                    style = {"marker": "o", "linestyle": "--"} if split == "eval" else {}
                    ax.plot(xs, [100 * y for y in ys] if key == "mfu" else ys, label=f"{split} {key}", **style)
            ax.set_title(f"{s.name} ({s.kind})")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if len(keys) > 1:
                ax.legend(fontsize=8)
            if key == "mfu":
                ax.set_ylabel("%")
        fig.suptitle(title)
        out[title] = _png(fig)
    evaluated = [s for s in rep.stages if s.metrics]
    names = [m for m in rep.metric_names if sum(m in s.metrics for s in evaluated) >= 1]
    if evaluated and names:
        cols = min(4, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        for ax, m in zip(axes.flat, names, strict=False):
            xs = [i for i, s in enumerate(evaluated) if m in s.metrics]
            ys = [evaluated[i].metrics[m] for i in xs]
            ax.plot(xs, ys, marker="o")
            if m.endswith(".perplexity") and min(ys) > 0:
                ax.set_yscale("log")  # a random start is thousands, a trained model tens
            ax.set_xticks(range(len(evaluated)), [s.name for s in evaluated], fontsize=8)
            ax.set_title(m, fontsize=9)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.suptitle("Evaluation across stages")
        fig.tight_layout()
        out["Evaluation across stages"] = _png(fig)
    return out


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f4f4f4}.bad{color:#b00;font-weight:bold}img{max-width:100%;display:block;margin:1em 0}
code{background:#f4f4f4;padding:0 3px}"""


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    def td(x: str) -> str:
        cls = ' class="bad"' if x.startswith(("BLOCKED", "DIVERGED", "stopped", "not run")) else ""
        return f"<td{cls}>{html.escape(x)}</td>"

    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(td(c) for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def html_page(rep: RunReport, images: dict[str, str]) -> str:
    sections, env_text, notes = card(rep)
    parts = [
        f"<h1>Run report: <code>{html.escape(str(rep.run_dir))}</code></h1>",
        f"<p><b>Status:</b> {html.escape(rep.status)}</p>",
        f"<p><b>Environment:</b> {html.escape(env_text)}</p>",
    ]
    for title, content in sections:
        body = f"<p><i>{html.escape(content)}</i></p>" if isinstance(content, str) else _html_table(*content)
        parts += [f"<h2>{html.escape(title)}</h2>", body]
    if notes:
        parts += ["<h2>Missing or incomplete</h2><ul>", *(f"<li>{html.escape(n)}</li>" for n in notes), "</ul>"]
    parts.append("<h2>Training curves and evaluations</h2>")
    if not images:
        parts.append("<p><i>No plots: nothing logged yet, or matplotlib is not installed.</i></p>")
    for title, data in images.items():
        alt = html.escape(title)
        parts.append(f'<h3>{alt}</h3><img alt="{alt}" src="data:image/png;base64,{data}">')
    body = "\n".join(parts)
    title = html.escape(f"Run report: {rep.run_dir}")
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style></head>'
        f"<body>\n{body}\n</body></html>\n"
    )


def write_report(run_dir: str | Path, output: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report/report.html`` and ``report/summary.md`` for ``run_dir``; returns their paths."""
    rep = collect(run_dir)
    out = Path(output) if output else rep.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    card = markdown_card(rep)
    page = html_page(rep, plots(rep))
    paths = out / "report.html", out / "summary.md"
    for path, text in zip(paths, (page, card), strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # a reader never sees half a report
    return paths
