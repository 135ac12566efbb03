"""``llm-pipeline preflight --config X``: check a run's prerequisites before it starts (exit 1 on blockers)."""

from __future__ import annotations

import argparse
import json


def cmd_preflight(args: argparse.Namespace) -> int:
    from llm_pipeline.hardware import environment_checks, probe_environment
    from llm_pipeline.preflight import check_options, render, run_preflight

    cap = args.gpu_capability
    check_options(args.gpus, args.gpu_memory_gib, args.data_sample, cap)
    if args.config is None and not args.devices:
        raise ValueError("pass --config PIPELINE_OR_STAGE.yaml (or --devices for the machine alone)")
    env = probe_environment(gpus=args.gpus, gpu_memory_gib=args.gpu_memory_gib, gpu_capability=cap)
    if args.devices and args.config is None:
        checks = environment_checks(env)
    else:
        checks = run_preflight(
            args.config, kind=args.kind, data_sample=args.data_sample, env=env, trace_memory=args.trace_memory
        )
    if args.json:
        print(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        render(checks)
    return 1 if any(c.status == "BLOCKER" for c in checks) else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preflight",
        help="check a pipeline or stage config before running it: versions, GPUs/FP8, memory, disk, data, "
        "outputs (exit 1 on blockers; allocates nothing)",
    )
    p.add_argument("--config", help="pipeline config (configs/pipeline.yaml) or a stage config")
    p.add_argument("--devices", action="store_true", help="only the machine: versions, GPUs, FP8, memory")
    p.add_argument("--kind", help="stage kind of a stage config when its keys fit several (pretrain, sft, ...)")
    p.add_argument("--gpus", type=int, help="plan for this many GPUs instead of the visible ones (simulated)")
    p.add_argument("--gpu-memory-gib", type=float, help="memory of each simulated GPU (default 80)")
    p.add_argument("--gpu-capability", help="compute capability of the simulated GPUs, e.g. 9.0 (H100), 8.0 (A100)")
    p.add_argument(
        "--data-sample", type=int, default=2000, help="chat records built to count truncation damage (0 = skip)"
    )
    p.add_argument(
        "--trace-memory",
        action="store_true",
        help="memory plan from one training step traced at full size on fake tensors and a fake process group "
        "(per-rank params, grads, optimizer, activations; seconds per stage) instead of the formula estimate",
    )
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_preflight)
