"""``llm-pipeline report [RUN_DIR]``: the HTML report and Markdown card of a finished (or stopped) run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> int:
    from llm_pipeline.report import write_report
    from llm_pipeline.runs import default_run

    run_dir = Path(args.run_dir) if args.run_dir else default_run()
    if run_dir is None:
        raise FileNotFoundError("runs: no run folder found; pass RUN_DIR (e.g. runs/demo)")
    if not args.run_dir:
        print(f"report: {run_dir} (runs/demo if present, else the newest run; pass RUN_DIR to choose)", file=sys.stderr)
    page, card = write_report(run_dir, args.output)
    print(f"report: {page}\ncard:   {card}")
    if args.print:
        print()
        print(card.read_text(encoding="utf-8"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write RUN_DIR/report/report.html (plots embedded) and summary.md from a run's files",
    )
    p.add_argument("run_dir", nargs="?", help="run folder (default: runs/demo if present, else the newest run)")
    p.add_argument("--output", help="folder for the two files (default: RUN_DIR/report)")
    p.add_argument("--print", action="store_true", help="also print the Markdown card")
    p.set_defaults(func=cmd_report)
