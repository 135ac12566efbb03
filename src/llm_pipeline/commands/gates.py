"""``llm-pipeline gates STAGE``: check a stage's evaluation against its promotion gate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_gates(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from llm_pipeline.gates import check_gate

    results = args.results or Path(args.evals_dir) / f"{args.stage}_final"
    verdict = check_gate(args.stage, results, config=args.config, baseline=args.baseline)
    table = Table(title=f"promotion gate: {args.stage}")
    for col in ("metric", "value", "result", "detail"):
        table.add_column(col)
    for r in verdict.results:
        value = "-" if r.value is None else f"{r.value:.4g}"
        table.add_row(r.metric, value, "[green]pass[/]" if r.passed else "[red]FAIL[/]", r.reason)
    console = Console()
    console.print(table)
    console.print(f"stage {args.stage}: {'[green]PROMOTED[/]' if verdict.passed else '[red]BLOCKED[/]'}")
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
    p.add_argument("--evals-dir", default="evals", help="where `llm-pipeline eval` wrote its results")
    p.add_argument("--config", default="configs/promotion_gates.yaml")
    p.add_argument("--json", action="store_true", help="also print the verdict as JSON")
    p.set_defaults(func=cmd_gates)
