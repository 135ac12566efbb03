"""``llm-pipeline eval``: run the evaluation suite on a model directory (parsing only)."""

from __future__ import annotations

import argparse

from llm_pipeline.eval.task import EVAL_TASKS

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
    p.add_argument("--samples", help="HumanEval samples JSONL (task_id, completion) to score instead of generating")
    p.add_argument("--text", action="append", metavar="FILE", help="text/JSONL file for perplexity (repeatable)")
    p.add_argument("--packed-data", help="packed token shards root for perplexity (held-out split)")
    p.add_argument("--mmlu", dest="mmlu_source", help="MMLU source: local CSV dir or hub id (default cais/mmlu)")
    p.add_argument(
        "--lm-eval",
        dest="lm_eval",
        metavar="TASKS",
        help="comma-separated lm-evaluation-harness tasks, groups or suites (lm_eval.suites in the config); "
        "runs the lm_eval eval (added to --tasks, or alone)",
    )
    p.add_argument(
        "--include-path", action="append", metavar="DIR", help="folder of custom lm-eval task YAMLs (repeatable)"
    )
    p.add_argument(
        "--backend",
        choices=["pipeline", "hf"],
        help="lm-eval model: pipeline (ours, batched; default) or hf (lm-eval's HFLM on the export, the reference)",
    )
    p.add_argument("--workers", type=int, help="HumanEval programs run in parallel")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field, e.g. mmlu.batch_size=32")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from llm_pipeline.eval.plan import evaluate

    def names(text: str | None) -> list[str] | None:
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    results = evaluate(
        args.checkpoint,
        config=args.config,
        tasks=names(args.tasks),
        lm_eval=names(args.lm_eval),
        sets=args.set or (),
        overrides={  # the flags are shorthands for these config keys
            "limit": args.limit,
            "device": args.device,
            "dtype": args.dtype,
            "humaneval.samples": args.samples,
            "humaneval.workers": args.workers,
            "perplexity.files": args.text,
            "perplexity.packed_data": args.packed_data,
            "mmlu.source": args.mmlu_source,
            "lm_eval.include_path": args.include_path,
            "lm_eval.backend": args.backend,
        },
        timeout_s=args.timeout,
        output=args.output,
    )
    return 1 if results.failed() else 0
