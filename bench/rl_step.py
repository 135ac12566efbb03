"""The RL step's split: generation, scoring, reference and training time per step.

Runs the RL stage (``configs/demo/rl.yaml``'s settings unless overridden) for ``--steps`` steps from
``--model`` (an HF chat model folder, e.g. the SFT model of ``bench/rl_demo_check.py``), or from a fresh
model of ``--preset`` with a BPE trained on the arithmetic task, and prints the mean seconds per step of each
part (the ``timing/*`` metrics the stage logs: generation with our KV-cache generator, the reward functions,
the reference/old log-prob passes, and the rest of the step: forward, backward, optimizer).

    python bench/rl_step.py [--model DIR | --preset debug] [--steps 5] [--beta 0.04] [--set rl.num_generations=16]

CPU figures depend on load: re-time on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

PARTS = ("generation", "scoring", "reference", "training")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--config", type=Path, default=Path("configs/demo/rl.yaml"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--beta", type=float, default=None, help="KL weight (> 0 adds the reference pass)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()

    from llm_pipeline.checkpoint.hf import save_pretrained
    from llm_pipeline.data.arithmetic import chat_records
    from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer
    from llm_pipeline.model import build_model, get_preset
    from llm_pipeline.train.rl import RLConfig, RLStage
    from llm_pipeline.train.stage import run_stage

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = args.model
        if model is None:
            texts = [m["content"] for item in chat_records() for m in item.record["messages"]]
            save_tokenizer(train_tokenizer(texts, vocab_size=400), tmp / "tok")
            preset = get_preset(args.preset, vocab_size=512)
            model = save_pretrained(build_model(preset, seed=0), tmp / "model", tokenizer_dir=tmp / "tok")
        raw = yaml.safe_load(args.config.read_text())
        raw["model"] = {"init_from": str(model)}
        raw["training"].update({"max_steps": args.steps, "eval_steps": 0, "save_steps": 0, "logging_steps": 1,
                                "output_dir": str(tmp / "rl"), "logging_dir": str(tmp / "logs"),
                                "resume_from_checkpoint": None})  # fmt: skip
        if args.beta is not None:
            raw["rl"]["beta"] = args.beta
        for item in args.set:
            key, _, value = item.partition("=")
            section, _, name = key.partition(".")
            raw.setdefault(section, {})[name] = yaml.safe_load(value)
        cfg = RLConfig.model_validate(raw)
        run_stage(RLStage(cfg))
        rows = [json.loads(x) for x in (tmp / "logs" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if r.get("split") == "train"][1:] or [r for r in rows if r.get("split") == "train"]
    mean = {p: sum(r[f"timing/{p}_s"] for r in steps) / len(steps) for p in PARTS}
    total = sum(mean.values())
    rl = cfg.rl
    print(f"RL step of {rl.prompts_per_step} prompts x {rl.num_generations} completions (<= {rl.max_new_tokens} new "
          f"tokens, beta {rl.beta}), mean of {len(steps)} step(s) after the first:")  # fmt: skip
    for p in PARTS:
        print(f"  {p:<11} {mean[p]:8.3f}s  {100 * mean[p] / total:5.1f}%")
    print(f"  {'step':<11} {total:8.3f}s; completions/mean_length {steps[-1]['completions/mean_length']:.1f}")


if __name__ == "__main__":
    main()
