"""DPO step: cached reference log-probs vs a live reference model, same weights and batch.

The reference model of DPO is the frozen start model. With ``dpo.reference: cached`` its summed
log-probs of every pair are computed once before training and ride along in each batch; with
``live`` a second copy of the model sits next to the policy and runs a forward (no gradients) on
every micro-batch. Both variants run our ``Trainer.train_step`` (one forward of chosen + rejected
rows, the sigmoid DPO loss, backward, clipping, fused AdamW) on the same model, weights and batch,
each in its own process so that its peak memory is its own:

- CPU: peak resident memory (``ru_maxrss``) minus the resident memory before any model was built,
  so the live variant's second copy of the weights counts;
- GPU: ``torch.cuda.max_memory_allocated`` (nothing is allocated before the models).

The first step's loss must agree between the two (fp32: 1e-5); the cached variant's one-time pass
over the batch is timed too. Results go into docs/benchmarks.md.

    python bench/dpo_step.py [--preset tiny] [--pairs 8] [--seq 512] [--steps 3] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from _machine import machine_line, rss_mib  # bench/ is on sys.path when a bench runs

VARIANTS = ("cached", "live")


def _pairs(args: argparse.Namespace, vocab: int):
    """A fixed preference source: prompts of seq/4 tokens, completions filling the rest (random lengths)."""
    import numpy as np

    from llm_pipeline.data.preference import PreferenceBatchSource, PreferencePairs
    from llm_pipeline.data.sft import TokenExamples

    rng = np.random.default_rng(0)
    prompt = args.seq // 4
    sides = []
    for _ in range(2):
        rows = []
        for _ in range(args.pairs):
            n = int(rng.integers(args.seq // 2, args.seq + 1))
            rows.append((rng.integers(5, vocab, n).tolist(), [0] * prompt + [1] * (n - prompt)))
        sides.append(TokenExamples.from_lists(rows))
    return PreferenceBatchSource(PreferencePairs(*sides), micro_batch_size=args.pairs, seed=0)


class FixedPairs:
    """Serves the same batch of pairs forever (the benchmark measures compute, not data)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.batch

    def set_micro_batch_size(self, rows: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def child(args: argparse.Namespace) -> None:
    from llm_pipeline.model import build_model, get_preset
    from llm_pipeline.train.batching import RowBatching
    from llm_pipeline.train.config import TrainingConfig
    from llm_pipeline.train.dpo_loss import DPOObjective
    from llm_pipeline.train.dpo_reference import compute_reference_logps
    from llm_pipeline.train.parallel import DistInfo
    from llm_pipeline.train.trainer import Trainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_preset(args.preset)
    source = _pairs(args, cfg.vocab_size)
    base = rss_mib()
    policy = build_model(cfg, seed=0, device=device)
    reference = None
    pass_s = 0.0
    if args.child == "live":
        reference = build_model(cfg, seed=0, device=device).requires_grad_(False).eval()
    else:
        t0 = time.perf_counter()
        table = compute_reference_logps(
            policy, source, DistInfo(device=device), micro_batch_size=args.pairs, precision=args.precision,
            chunk_tokens=2048,
        )  # fmt: skip
        pass_s = time.perf_counter() - t0
        table.attach_to(source)
    batch = source.next_batch()
    objective = DPOObjective(["sigmoid"], beta=0.1, reference_model=reference)
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = TrainingConfig(
            global_batch_size=args.pairs, micro_batch_size=args.pairs, precision=args.precision, warmup_steps=0,
            lr_schedule="constant", learning_rate=1e-5, output_dir=tmp, max_steps=10**6,
        )  # fmt: skip
        trainer = Trainer(
            model=policy, objective=objective, train_source=FixedPairs(batch), cfg=tcfg, model_config=cfg,
            info=DistInfo(device=device), batching=RowBatching(args.pairs, args.pairs, unit="pairs"),
        )  # fmt: skip
        trainer.prepare()
        first = trainer.train_step()
        times = []
        for _ in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trainer.train_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps({
        "first_loss": first["loss"], "peak_mib": peak, "step_s": statistics.median(times), "min_step_s": min(times),
        "tokens": first["tokens"], "pass_s": pass_s, "device": str(device),
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step (one micro-batch: 2x rows)")
    ap.add_argument("--seq", type=int, default=512, help="longest prompt + completion")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    print(machine_line())
    print(f"model: {args.preset} preset; {args.pairs} pairs of <= {args.seq} tokens per step, {args.precision}")
    results = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--child", v, "--preset", args.preset, "--pairs", str(args.pairs),
               "--seq", str(args.seq), "--steps", str(args.steps), "--precision", args.precision]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[v] = r = json.loads(out)
        print(f"{v:7s} first loss {r['first_loss']:.6f}  peak +{r['peak_mib']:.0f} MiB  step {r['step_s']:.3f} s "
              f"(min {r['min_step_s']:.3f})  {r['tokens'] / r['step_s']:.0f} tok/s  on {r['device']}")  # fmt: skip
    c, live = results["cached"], results["live"]
    print(f"cached reference pass over the batch: {c['pass_s']:.3f} s (once per run, reused on resume)")
    print(f"peak memory: live / cached {live['peak_mib'] / c['peak_mib']:.2f}x")
    print(f"step time:   live / cached {live['step_s'] / c['step_s']:.2f}x")
    print(f"first-step loss |cached - live| {abs(c['first_loss'] - live['first_loss']):.2e}")


if __name__ == "__main__":
    main()
