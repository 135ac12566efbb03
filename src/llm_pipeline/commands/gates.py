"""``llm-pipeline gates STAGE``: check a stage's evaluation against its promotion gate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_GATES = "configs/promotion_gates.yaml"


def _run_gates_file(run_dir: Path) -> str | None:
    """The gates file the run was made with (``gates:`` of its ``pipeline.resolved.yaml``)."""
    import yaml

    try:
        data = yaml.safe_load((run_dir / "pipeline.resolved.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    gates = data.get("gates") if isinstance(data, dict) else None
    return str(gates) if gates and Path(str(gates)).is_file() else None


def resolve_sources(args: argparse.Namespace) -> tuple[Path, str]:
    """(results of the stage, gates config): from --results / --run-dir / --evals-dir, else ./evals when it
    holds the stage, else the newest run under runs/ that evaluated it (said on stderr)."""
    from llm_pipeline.runs import newest_run

    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is not None and not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    wanted = f"{args.stage}_final"
    if run_dir is None and not args.results and not args.evals_dir and not (Path("evals") / wanted).is_dir():
        run_dir = newest_run(where=lambda r: (r / "evals" / wanted / "results.json").is_file())
        if run_dir is not None:
            print(f"gates: no ./evals/{wanted}; using {run_dir} (the newest run that evaluated {args.stage}; "
                  "--run-dir to choose)", file=sys.stderr)  # fmt: skip
    evals = Path(args.evals_dir) if args.evals_dir else (run_dir / "evals" if run_dir else Path("evals"))
    results = Path(args.results) if args.results else evals / wanted
    config = args.config or (run_dir and _run_gates_file(run_dir)) or DEFAULT_GATES
    return results, config


def cmd_gates(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from llm_pipeline.gates import check_gate
    from llm_pipeline.pipeline import recorded_gate_baseline

    results, config = resolve_sources(args)
    baseline_stage = None if args.baseline else recorded_gate_baseline(results, args.stage, config)
    verdict = check_gate(args.stage, results, config=config, baseline=args.baseline, baseline_stage=baseline_stage)
    table = Table(title=f"promotion gate: {args.stage}")
    for col in ("metric", "value", "result", "detail"):
        table.add_column(col)
    for r in verdict.results:
        value = "-" if r.value is None else f"{r.value:.4g}"
        table.add_row(r.metric, value, "[green]pass[/]" if r.passed else "[red]FAIL[/]", r.reason)
    console = Console()
    console.print(table)
    console.print(f"stage {args.stage}: {'[green]PROMOTED[/]' if verdict.passed else '[red]BLOCKED[/]'} "
                  f"({results}, {config})")  # fmt: skip
    if args.json:
        print(json.dumps(verdict.to_dict()))
    return 0 if verdict.passed else 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gates", help="check a stage's evaluation results against configs/promotion_gates.yaml (exit 3 = blocked)"
    )
    p.add_argument("stage", help="stage name, e.g. pretrain, sft, dpo, lora")
    p.add_argument("--results", help="results.json or its folder (default: EVALS_DIR/<stage>_final)")
    p.add_argument("--baseline", help="baseline results for regression rules (default: the gate's baseline_stage)")
    p.add_argument(
        "--run-dir",
        help="a pipeline run (e.g. runs/7b): its evals/ and the gates file it ran with (default: ./evals if it "
        "holds the stage, else the newest run under runs/ that evaluated it)",
    )
    p.add_argument("--evals-dir", help="where `llm-pipeline eval` wrote its results (default: see --run-dir)")
    p.add_argument("--config", help=f"gates YAML (default: the run's, else {DEFAULT_GATES})")
    p.add_argument("--json", action="store_true", help="also print the verdict as JSON")
    p.set_defaults(func=cmd_gates)
