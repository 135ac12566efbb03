"""``llm-pipeline run`` / ``llm-pipeline demo``: the whole pipeline from one config."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_run(args: argparse.Namespace) -> int:
    from llm_pipeline.config import load_config
    from llm_pipeline.pipeline import GateBlocked, PipelineConfig, StageStopped, run_pipeline

    cfg = load_config(PipelineConfig, args.config, args.set or (), run_dir=args.run_dir)
    try:
        summary = run_pipeline(cfg, start=args.start, only=args.only)
    except GateBlocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except StageStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 75 if e.status == "preempted" else 1
    gates = {name: s["gate"]["passed"] for name, s in summary["stages"].items() if "gate" in s}
    brief = {"run_dir": summary["run_dir"], "gates_passed": gates, "generate": summary.get("generate")}
    print(json.dumps(brief, indent=2))
    print(f"full summary: {cfg.run_dir / 'summary.json'}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", dest="run_dir", help="override run_dir (every output goes below it)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any pipeline config key")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--from",
        dest="start",
        metavar="STEP",
        help="start at this step (data or a stage name); earlier ones as recorded",
    )
    which.add_argument("--only", metavar="STEP", help="run just this step (data or a stage name)")
    p.set_defaults(func=cmd_run)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the pipeline (data, then each training stage with its eval and gate) from one config; "
        "exit 3 = gate blocked, 75 = a stage was stopped (run again to resume)",
    )
    p.add_argument("--config", required=True, help="pipeline config YAML, e.g. configs/pipeline.yaml")
    _add_common(p)
    p = sub.add_parser(
        "demo", help="the offline CPU demo: `run` with configs/demo/pipeline.yaml (what `make demo` runs)"
    )
    p.add_argument("--config", default="configs/demo/pipeline.yaml", help="pipeline config YAML")
    _add_common(p)
