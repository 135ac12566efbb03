"""Training subcommands, one per stage kind (``pretrain``, and every kind in ``STAGE_KINDS``).

All of them take the spec's flags (``scripts/05_pretrain.py``, ``07_sft.py``, ``09_dpo.py``,
``10_lora_finetune.py``) and ``--set``; the stage runner does the work.
"""

from __future__ import annotations

import argparse
import sys

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: state saved, requeue and resume with --resume_from_checkpoint auto
EXIT_DIVERGED = 3


def add_training_flags(p: argparse.ArgumentParser, example_config: str = "configs/pretrain.yaml") -> None:
    """Flags shared by every stage that runs on the training loop."""
    p.add_argument("--config", required=True, help=f"YAML config (e.g. {example_config})")
    p.add_argument("--max_steps", type=int, help="optimizer steps to run (replaces training.num_epochs)")
    p.add_argument("--save_steps", type=int, help="checkpoint every N steps (0 = only at the end)")
    p.add_argument("--eval_steps", type=int, help="validation loss/perplexity every N steps (0 = never)")
    p.add_argument("--logging_steps", type=int, help="metrics line every N steps")
    p.add_argument(
        "--output_dir",
        help="checkpoint folder; the HF export goes to <output_dir>_final and, unless --logging_dir is given, "
        "the metrics to <output_dir>/logs",
    )
    p.add_argument("--logging_dir", help="TensorBoard + metrics.jsonl folder (same as --set training.logging_dir=DIR)")
    p.add_argument(
        "--resume_from_checkpoint",
        help="'auto' = newest committed checkpoint in output_dir (fresh start if none), or a checkpoint folder",
    )
    p.add_argument(
        "--fp8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--fp8 requires torchao float8 training (H100-class GPU), --no-fp8 disables it; default: auto",
    )
    p.add_argument(
        "--enable-oom-recovery",
        dest="enable_oom_recovery",
        action="store_true",
        default=None,
        help="on CUDA OOM halve the micro-batch and double accumulation (global batch unchanged)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set training.learning_rate=1e-4 (repeatable)",
    )


def training_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The dedicated flags as dotted config keys (``None`` = not given)."""
    return {
        "training.max_steps": args.max_steps,
        "training.save_steps": args.save_steps,
        "training.eval_steps": args.eval_steps,
        "training.logging_steps": args.logging_steps,
        "training.output_dir": args.output_dir,
        "training.logging_dir": args.logging_dir,
        "training.resume_from_checkpoint": args.resume_from_checkpoint,
        "training.enable_oom_recovery": args.enable_oom_recovery,
        "parallel.fp8": args.fp8,
    }


def stage_config_from_args(kind: str, args: argparse.Namespace):
    """The stage's config: file, then ``--set``, then the dedicated flags, validated once."""
    from llm_pipeline.config import load_config
    from llm_pipeline.train.stage import stage_class

    overrides = list(args.overrides)
    if args.output_dir is not None and args.logging_dir is None and not _sets(overrides, "training.logging_dir"):
        overrides.append("training.logging_dir=null")  # the logs move with the checkpoints, unless placed
    if args.max_steps is not None:
        overrides.append("training.num_epochs=null")  # an explicit step count wins over epochs
    return load_config(stage_class(kind).config_class, args.config, overrides, **training_overrides(args))


def _sets(overrides: list[str], key: str) -> bool:
    """Whether one of the ``--set KEY=VALUE`` overrides sets ``key``."""
    return any(o.partition("=")[0].strip() == key for o in overrides)


def pretrain_config_from_args(args: argparse.Namespace):
    return stage_config_from_args("pretrain", args)


def _run(args: argparse.Namespace) -> int:
    from llm_pipeline.train.stage import run_stage, stage_class

    cfg = stage_config_from_args(args.kind, args)
    result = run_stage(stage_class(args.kind)(cfg))
    kind = args.kind
    print(f"{kind}: {result.status} at step {result.step}; checkpoint {result.checkpoint}")
    for name, path in result.exports.items():
        print(f"{kind}: {name} -> {path}")
    if result.status == "preempted":
        again = (
            "run the same command to resume"
            if cfg.training.resume_from_checkpoint == "auto"
            else "resume with the same command plus --resume_from_checkpoint auto"
        )
        print(f"{kind}: stopped at step {result.step} with its checkpoint saved; {again}", file=sys.stderr)
        return EXIT_PREEMPTED
    if result.status == "diverged":
        return EXIT_DIVERGED
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from llm_pipeline.train.kinds import EXAMPLE_CONFIGS, STAGE_KINDS, STAGE_SUMMARIES

    for kind in STAGE_KINDS:
        p = sub.add_parser(
            kind,
            help=STAGE_SUMMARIES.get(kind, f"the {kind} training stage"),
            description=f"{STAGE_SUMMARIES.get(kind, kind)}. Resume, FP8/bf16, OOM recovery, FSDP2 under torchrun. "
            f"Exit codes: 0 done, {EXIT_PREEMPTED} stopped by a signal (SIGTERM/SIGUSR1/Ctrl-C) after saving, "
            f"{EXIT_DIVERGED} diverged, 1/2 errors.",
        )
        add_training_flags(p, EXAMPLE_CONFIGS.get(kind, f"configs/{kind}.yaml"))
        p.set_defaults(func=_run, kind=kind)
