"""``llm-pipeline demo``: the whole pipeline from one config."""

from __future__ import annotations

import argparse
import json


def cmd_demo(args: argparse.Namespace) -> int:
    from llm_pipeline.config import load_config
    from llm_pipeline.pipeline import PipelineConfig, run_pipeline

    cfg = load_config(PipelineConfig, args.config, args.set or (), run_dir=args.run_dir)
    summary = run_pipeline(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the full pipeline from one config (default: the offline CPU demo)")
    p.add_argument("--config", default="configs/demo/pipeline.yaml", help="pipeline config YAML")
    p.add_argument("--run-dir", dest="run_dir", help="override run_dir")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key")
    p.set_defaults(func=cmd_demo)
