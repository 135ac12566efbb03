"""Standalone demo-size check of the RL stage: does RL raise held-out arithmetic accuracy past its standard error?

Builds a byte-level BPE on the standard library (as the demo's data step does, vocab 8192), a `tiny` model
(the demo preset), SFT on the embedded arithmetic chat source (``data.kind: arithmetic``) for ``--sft-steps``,
then the RL stage with ``configs/demo/rl.yaml``'s settings; held-out accuracy (the ~1,000 held-out problems,
greedy) is measured before and after with the ``arithmetic_accuracy`` eval task, with the paired standard
error of the rise (the same problems both times), and the RL stage's wall time printed. ``--sft-model``
starts from an existing SFT/DPO export instead.

    python bench/rl_demo_check.py --out /tmp/rl_demo --sft-steps 150

CPU figures depend on load: re-time on an idle machine (2 cores, OMP_NUM_THREADS=2).
"""

from __future__ import annotations

import argparse
import glob
import math
import sysconfig
import time
from pathlib import Path

import yaml


def accuracy(model_dir: Path, task_settings: dict) -> tuple[float, float, int, list[bool]]:
    from llm_pipeline.eval.arithmetic import ArithmeticAccuracyTask, ArithmeticConfig
    from llm_pipeline.eval.budget import Budget
    from llm_pipeline.eval.model_handle import ModelHandle
    from llm_pipeline.eval.task import TaskContext

    task = ArithmeticAccuracyTask("arithmetic_accuracy", ArithmeticConfig(**task_settings))
    metrics, samples = task.run(TaskContext(ModelHandle(model_dir, device="cpu"), Budget(None), None, 0))
    return metrics["accuracy"], metrics["stderr"], metrics["n"], [bool(s["correct"]) for s in samples]


def paired_se(before: list[bool], after: list[bool]) -> float:
    """Standard error of the mean per-problem change in correctness (same problems before and after)."""
    d = [float(b) - float(a) for a, b in zip(before, after, strict=True)]
    m = sum(d) / len(d)
    return math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/rl_demo"))
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--rl-config", type=Path, default=Path("configs/demo/rl.yaml"))
    ap.add_argument("--rl-steps", type=int, default=None, help="override training.max_steps of the RL config")
    ap.add_argument("--sft-model", type=Path, default=None, help="start RL from this export (no SFT run)")
    args = ap.parse_args()

    from llm_pipeline.checkpoint.hf import save_pretrained
    from llm_pipeline.data.arithmetic import task_of
    from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer
    from llm_pipeline.model import build_model, get_preset
    from llm_pipeline.train.rl import RLConfig, RLStage
    from llm_pipeline.train.sft import SFTConfig, SFTStage
    from llm_pipeline.train.stage import run_stage

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # The RL config's task (operands, held-out split) is the one SFT trains on and both evaluations score, so
    # no held-out problem is ever trained on.
    raw = yaml.safe_load(args.rl_config.read_text())
    task = task_of(RLConfig.model_validate(raw).data)
    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/**/*.py", recursive=True))[:600]
        save_tokenizer(train_tokenizer([Path(f).read_text(errors="ignore") for f in files], vocab_size=8192), tok)
    init = out / "init"
    if not (init / "config.json").is_file():
        save_pretrained(build_model(get_preset("tiny"), seed=0), init, tokenizer_dir=tok)
    sft_final = args.sft_model or out / "sft_final"
    if not (sft_final / "config.json").is_file():
        sft = SFTConfig.model_validate({
            "model": {"preset": None, "init_from": str(init)},
            "data": {"kind": "arithmetic", "max_seq_len": 128, "packing": True, **task},
            "training": {"max_steps": args.sft_steps, "global_batch_size": 16, "micro_batch_size": 16,
                         "learning_rate": args.sft_lr, "warmup_steps": 10, "precision": "fp32", "logging_steps": 25,
                         "eval_steps": 0, "save_steps": 0, "output_dir": str(out / "sft"),
                         "logging_dir": str(out / "logs/sft")},
            "parallel": {"device": "cpu", "fp8": False},
        })  # fmt: skip
        run_stage(SFTStage(sft))
    before = accuracy(sft_final, task)
    print(f"SFT model: held-out accuracy {before[0]:.3f} ± {before[1]:.3f} (n={before[2]})", flush=True)

    raw["model"] = {"init_from": str(sft_final)}
    raw["training"].update({"output_dir": str(out / "rl"), "logging_dir": str(out / "logs/rl"),
                            "resume_from_checkpoint": None})  # fmt: skip
    if args.rl_steps:
        raw["training"]["max_steps"] = args.rl_steps
    start = time.perf_counter()
    result = run_stage(RLStage(RLConfig.model_validate(raw)))
    rl_time = time.perf_counter() - start
    after = accuracy(out / "rl_final", task)
    se = math.sqrt(before[1] ** 2 + after[1] ** 2)
    print(f"SFT model: held-out accuracy {before[0]:.3f} ± {before[1]:.3f}")
    print(f"RL model:  held-out accuracy {after[0]:.3f} ± {after[1]:.3f} (n={after[2]})")
    print(f"rise {after[0] - before[0]:+.3f} (paired SE {paired_se(before[3], after[3]):.3f}, unpaired {se:.3f}); "
          f"RL stage {rl_time:.1f}s ({result.step} steps, status {result.status})")  # fmt: skip


if __name__ == "__main__":
    main()
