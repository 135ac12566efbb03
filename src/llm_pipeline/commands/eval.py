"""``llm-pipeline eval``: run the evaluation suite on a model directory (parsing only)."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm_pipeline.eval.config import EvalConfig

EPILOG = """examples:
  llm-pipeline eval checkpoints/dpo_final --tasks mmlu,humaneval --limit 20
  llm-pipeline eval checkpoints/sft_final --config configs/eval.yaml --set mmlu.source=data/mmlu
  llm-pipeline eval humaneval --samples samples.jsonl      (score completions of any system, no model)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: perplexity, MMLU/ARC/HellaSwag, HumanEval (sandboxed), safety",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="HF-format model directory, or 'humaneval' together with --samples")
    p.add_argument(
        "--config",
        help="eval YAML (see configs/eval.yaml); flags below override it. Without --config and --tasks: "
        "configs/eval.yaml when present, running the evals whose data is available here (the others are "
        "named with the flag that enables them)",
    )
    p.add_argument("--tasks", help="comma-separated evals: perplexity,mmlu,arc,hellaswag,humaneval,safety")
    p.add_argument("--limit", type=int, help="at most N samples per eval (MMLU: per subject)")
    p.add_argument("--output", help="results folder (default: evals/<checkpoint name>)")
    p.add_argument("--timeout", type=float, help="wall-clock seconds for each eval (overrides every <task>.timeout_s)")
    p.add_argument("--samples", help="HumanEval samples JSONL (task_id, completion) to score instead of generating")
    p.add_argument("--text", action="append", metavar="FILE", help="text/JSONL file for perplexity (repeatable)")
    p.add_argument("--packed-data", help="packed token shards root for perplexity (held-out split)")
    p.add_argument("--mmlu", dest="mmlu_source", help="MMLU source: local CSV dir or hub id (default cais/mmlu)")
    p.add_argument("--workers", type=int, help="HumanEval programs run in parallel")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field, e.g. mmlu.batch_size=32")
    p.set_defaults(func=cmd_eval)


DEFAULT_CONFIG = "configs/eval.yaml"


def _runnable_here(cfg: EvalConfig, config: str | None, model_dir: Path, *, explicit_data: bool) -> EvalConfig:
    """No config and no --tasks: the suite that can run on this machine, each skipped eval named with its fix.

    Perplexity scores the held-out split of the run the model belongs to when the config's data is absent.
    """
    from llm_pipeline.eval.availability import unavailable_reason
    from llm_pipeline.runs import is_run_dir

    say = functools.partial(print, file=sys.stderr)
    say(f"eval: no --config: using {config or 'the built-in defaults'}; evals that cannot run here are skipped "
        "(name them with --tasks to run them anyway)")  # fmt: skip
    if not explicit_data and unavailable_reason("perplexity", cfg):
        run = next((p for p in model_dir.resolve().parents if is_run_dir(p)), None)
        packed = run / "data" / "packed" if run else None
        if packed is not None and (packed / "manifest.json").is_file():
            say(f"eval: perplexity on {packed} (the held-out split of the run this model belongs to)")
            cfg = cfg.model_copy(update={"perplexity": cfg.perplexity.model_copy(update={"packed_data": str(packed)})})
    keep = []
    for task in dict.fromkeys(cfg.tasks):
        why = unavailable_reason(task, cfg)
        if why:
            say(f"eval: skipping {task}: {why}")
        else:
            keep.append(task)
    if not keep:
        raise ValueError("no evaluation can run here with these settings (see the reasons above)")
    cfg.tasks = keep  # type: ignore[assignment]
    return cfg


def cmd_eval(args: argparse.Namespace) -> int:
    from llm_pipeline.config import load_config
    from llm_pipeline.eval.config import ALL_TASKS, EvalConfig
    from llm_pipeline.eval.runner import run_evals

    model_dir: str | None = args.checkpoint
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.samples and args.checkpoint == "humaneval" and not Path(args.checkpoint).is_dir():
        model_dir, tasks = None, ["humaneval"]
    elif not Path(args.checkpoint).is_dir():
        raise FileNotFoundError(
            f"{args.checkpoint}: not a model directory (to score HumanEval samples without a model: "
            "llm-pipeline eval humaneval --samples FILE)"
        )
    flat: dict[str, object] = {
        "tasks": tasks,
        "limit": args.limit,
        "device": args.device,
        "dtype": args.dtype,
        "humaneval.samples": args.samples,
        "humaneval.workers": args.workers,
        "perplexity.files": args.text,
        "perplexity.packed_data": args.packed_data,
        "mmlu.source": args.mmlu_source,
    }
    if args.timeout is not None:
        flat.update({f"{t}.timeout_s": args.timeout for t in ALL_TASKS})
    planned = args.config is None and tasks is None and model_dir is not None
    config = args.config
    if planned and Path(DEFAULT_CONFIG).is_file():
        config = DEFAULT_CONFIG
    cfg = load_config(EvalConfig, config, args.set or (), **flat)
    if planned:
        cfg = _runnable_here(cfg, config, Path(model_dir), explicit_data=bool(args.packed_data or args.text))
    if model_dir is not None and not (Path(model_dir) / "config.json").is_file():
        from llm_pipeline.checkpoint.dcp import is_training_checkpoint

        hint = (
            f"a training checkpoint: export it first (llm-pipeline export {model_dir} OUT_DIR)"
            if is_training_checkpoint(model_dir)
            else "no config.json"
        )
        raise FileNotFoundError(f"{model_dir}: not an HF model directory ({hint})")
    if args.samples and not Path(args.samples).is_file():
        raise FileNotFoundError(f"{args.samples}: samples file not found")
    name = Path(model_dir).resolve().name if model_dir else f"samples-{Path(args.samples).stem}"
    output = args.output or str(Path("evals") / name)
    results = run_evals(model_dir, cfg, output=output)
    print(f"results: {Path(output) / 'results.json'}")
    return 1 if any(t["status"] == "error" for t in results["tasks"].values()) else 0
