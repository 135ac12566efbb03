"""Peak memory and tokens/s of a training step: chunked LM-head loss vs unchunked vs transformers.

The LM head and cross-entropy hold fp32 logits for every token of a micro-batch ([tokens, vocab]):
with a 50,304-token vocabulary at small width that dominates a step's memory. Our objectives run
the head in chunks (``training.loss_chunk_tokens``), recomputing each chunk in backward, so only one
chunk's logits ever exist. Three variants do one full training step (forward, loss, backward, clip,
AdamW) on the same config, weights, batch and dtype:

- ``ours-chunked``: our Trainer step, ``loss_chunk_tokens`` = 1024;
- ``ours-unchunked``: the same step, one chunk (the plain computation);
- ``hf``: ``transformers.LlamaForCausalLM(input_ids, labels=...)`` (its own loss) + AdamW.

Each variant runs in its own process, so its peak resident memory (``ru_maxrss``, minus the
resident memory once model and optimizer exist) is its own. The first step's loss must agree
across all three (fp32, 1e-5). Results go into docs/benchmarks.md.

    python bench/chunked_loss.py [--batch 4] [--seq 1024] [--vocab 50304] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from _machine import machine_line, rss_mib  # bench/ is on sys.path when a bench runs

VARIANTS = ("ours-chunked", "ours-unchunked", "hf")


def _setup(args: argparse.Namespace):
    from llm_pipeline.model import build_model, get_preset

    cfg = get_preset("tiny", vocab_size=args.vocab)
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    return cfg, build_model(cfg, seed=0), ids


def _ours(args: argparse.Namespace, chunk: int, out_dir: str):
    from llm_pipeline.train.config import CurriculumStage, TrainingConfig
    from llm_pipeline.train.objectives import CausalLMObjective
    from llm_pipeline.train.trainer import Trainer

    sys.path.insert(0, os.path.dirname(__file__))
    from train_step import FixedBatch

    _, model, ids = _setup(args)
    t = args.seq
    tcfg = TrainingConfig(
        global_batch_tokens=args.batch * t, micro_batch_size=args.batch, precision="fp32", warmup_steps=0,
        lr_schedule="constant", output_dir=out_dir, max_steps=10**6, loss_chunk_tokens=chunk,
    )  # fmt: skip
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    trainer = Trainer(
        model=model, objective=CausalLMObjective(chunk_tokens=chunk), train_source=FixedBatch(batch), cfg=tcfg,
        curriculum=[CurriculumStage(step=0, seq_len=t)],
    )  # fmt: skip
    trainer.prepare()
    return lambda: trainer.train_step()["loss"]


def _hf(args: argparse.Namespace):
    import transformers

    from llm_pipeline.checkpoint.hf import hf_config_dict

    cfg, ours, ids = _setup(args)
    hc = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(cfg, torch.float32).items() if k != "dtype"})
    model = transformers.LlamaForCausalLM._from_config(hc, attn_implementation="sdpa")
    model.load_state_dict(ours.state_dict())
    del ours
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step() -> float:
        # HF shifts labels itself (as HF users call it): T+1 ids score the same T targets as ours; the
        # extra last position's logits are computed and dropped (1/T more head work).
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        chunk = 1024 if args.child == "ours-chunked" else 0
        step = _hf(args) if args.child == "hf" else _ours(args, chunk, tmp)
        base = rss_mib()
        first = step()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tokens = args.batch * args.seq
        print(json.dumps({"first_loss": first, "peak_mib": peak - base, "tokens_per_s": tokens / min(times)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    print(machine_line())
    print(f"model: tiny preset (4 layers, hidden 256) with vocab {args.vocab}; batch {args.batch} x {args.seq}, fp32")
    results = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--child", v, "--batch", str(args.batch), "--seq", str(args.seq),
               "--vocab", str(args.vocab), "--steps", str(args.steps)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[v] = json.loads(out)
        r = results[v]
        print(f"{v:15s} first loss {r['first_loss']:.6f}  peak +{r['peak_mib']:.0f} MiB  {r['tokens_per_s']:.0f} tok/s")
    c, u, h = results["ours-chunked"], results["ours-unchunked"], results["hf"]
    print(f"peak memory: chunked / unchunked {c['peak_mib'] / u['peak_mib']:.2f}x, "
          f"chunked / HF {c['peak_mib'] / h['peak_mib']:.2f}x")  # fmt: skip
    print(f"tokens/s:    chunked / unchunked {c['tokens_per_s'] / u['tokens_per_s']:.2f}x, "
          f"chunked / HF {c['tokens_per_s'] / h['tokens_per_s']:.2f}x")  # fmt: skip
    print(f"first-step loss |chunked - unchunked| {abs(c['first_loss'] - u['first_loss']):.2e}, "
          f"|chunked - HF| {abs(c['first_loss'] - h['first_loss']):.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
