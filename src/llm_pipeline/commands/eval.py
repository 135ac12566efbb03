"""``llm-pipeline eval``: run the evaluation suite on a model directory (parsing only)."""

from __future__ import annotations

import argparse

from llm_pipeline.eval.task import EVAL_TASK_FLAGS, EVAL_TASKS

EPILOG = """examples:
  llm-pipeline eval checkpoints/dpo_final --tasks mmlu,humaneval --limit 20
  llm-pipeline eval checkpoints/sft_final --config configs/eval.yaml --set mmlu.source=data/mmlu
  llm-pipeline eval humaneval --samples samples.jsonl      (score completions of any system, no model)
  llm-pipeline eval checkpoints/sft_final --lm-eval arc_easy,piqa --limit 100
  llm-pipeline eval checkpoints/pretrain_final --config configs/eval.yaml --lm-eval olmes_base   (a suite)
  llm-pipeline eval checkpoints/sft_final --lm-eval my_task --include-path tasks/   (YAML tasks, local data)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help=f"evaluate a checkpoint on the registered evals ({', '.join(EVAL_TASKS)})",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="HF-format model directory, or 'humaneval' together with --samples")
    p.add_argument(
        "--config",
        help="eval YAML (see configs/eval.yaml); flags below override it. Without --config and --tasks: "
        "configs/eval.yaml when present, running the evals whose data is available here (the others are "
        "recorded as unavailable, with the flag that enables them)",
    )
    p.add_argument("--tasks", help=f"comma-separated evals: {','.join(EVAL_TASKS)}")
    p.add_argument("--limit", type=int, help="at most N samples per eval (MMLU: per subject)")
    p.add_argument("--output", help="results folder (default: evals/<checkpoint name>)")
    p.add_argument("--timeout", type=float, help="wall-clock seconds for each eval (overrides every <task>.timeout_s)")
    for task, flags in EVAL_TASK_FLAGS.items():  # each task's shorthands, declared in the registry
        for f in flags:
            p.add_argument(f.flag, **f.argparse_kwargs(task))
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field, e.g. mmlu.batch_size=32")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from llm_pipeline.eval.plan import evaluate

    def names(text: str | None) -> list[str] | None:
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    given = {f"{task}.{f.key}": (f.value(v), f) for task, flags in EVAL_TASK_FLAGS.items() for f in flags
             if (v := getattr(args, f"{task}.{f.key}")) is not None}  # fmt: skip
    results = evaluate(
        args.checkpoint,
        config=args.config,
        tasks=names(args.tasks),
        sets=args.set or (),
        overrides={  # the flags are shorthands for these config keys
            "limit": args.limit,
            "device": args.device,
            "dtype": args.dtype,
            **{key: value for key, (value, _) in given.items()},
        },
        selected=[key.split(".", 1)[0] for key, (value, f) in given.items() if f.selects and value],
        timeout_s=args.timeout,
        output=args.output,
    )
    return 1 if results.failed() else 0
