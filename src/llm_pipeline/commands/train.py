"""Training subcommands: ``pretrain`` (the spec's ``scripts/05_pretrain.py``)."""

from __future__ import annotations

import argparse

from llm_pipeline.config import load_config

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: state saved, requeue and resume with --resume_from_checkpoint auto
EXIT_DIVERGED = 3


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by every stage that runs on the training loop."""
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/pretrain.yaml)")
    p.add_argument("--max_steps", type=int, help="optimizer steps to run")
    p.add_argument("--save_steps", type=int, help="checkpoint every N steps (0 = only at the end)")
    p.add_argument("--eval_steps", type=int, help="validation loss/perplexity every N steps (0 = never)")
    p.add_argument("--logging_steps", type=int, help="metrics line every N steps")
    p.add_argument("--output_dir", help="checkpoint folder; the HF export goes to <output_dir>_final")
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
        "training.resume_from_checkpoint": args.resume_from_checkpoint,
        "training.enable_oom_recovery": args.enable_oom_recovery,
        "parallel.fp8": args.fp8,
    }


def pretrain_config_from_args(args: argparse.Namespace):
    from llm_pipeline.train.config import PretrainConfig

    return load_config(PretrainConfig, args.config, args.overrides, **training_overrides(args))


def _pretrain(args: argparse.Namespace) -> int:
    from llm_pipeline.train.pretrain import run_pretraining

    result = run_pretraining(pretrain_config_from_args(args))
    print(f"pretrain: {result.status} at step {result.step}; checkpoint {result.checkpoint}")
    if result.final_dir is not None:
        print(f"pretrain: final model (HF format) in {result.final_dir}")
    if result.status == "preempted":
        return EXIT_PREEMPTED
    if result.status == "diverged":
        return EXIT_DIVERGED
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a model on packed tokens (one process or torchrun/FSDP2)",
        description="Pretraining with curriculum, exact resume, FP8/bf16, OOM recovery. "
        f"Exit codes: 0 done, {EXIT_PREEMPTED} stopped by SIGTERM/SIGUSR1 after saving, {EXIT_DIVERGED} diverged.",
    )
    add_training_flags(p)
    p.set_defaults(func=_pretrain)
