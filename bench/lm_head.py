"""The LM head alone: CPU seconds and peak memory of the fused chunked cross-entropy's forward + backward.

``lm_head_loss`` (trained positions only, as the SFT stage runs it) over the rows of one SFT micro-batch:
8 rows of 512 with ``--rows`` labelled positions scattered among them, the `tiny` preset's hidden size,
vocabularies of the `tiny` preset (8,192, what ``bench/sft_packing.py`` trains) and the 7B preset
(50,304). Time is process CPU seconds of one thread (``OMP_NUM_THREADS=1``), median of ``--reps``:
less sensitive to other processes on the machine than wall time, though still not load-free (caches
and memory bandwidth are shared). Each configuration runs in its own process, so its peak resident
memory above the resident size before the first call is its own. To compare two versions of the
code, run this script with each on ``PYTHONPATH`` (same machine, alternating).

Baseline in the same run: what `transformers`' causal-LM loss does, the logits of every position
(``head(hidden)``, [8·512, vocab]) then ``F.cross_entropy(..., ignore_index=-100)``; the printed ratio is the
baseline's CPU seconds over ours (> 1: ours faster), with both losses (the same sum).

    OMP_NUM_THREADS=1 python bench/lm_head.py [--rows 2432] [--vocab 8192 50304] [--dtype fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from _machine import machine_line, rss_mib  # bench/ is on sys.path when a bench runs


def child(args: argparse.Namespace) -> None:
    from llm_pipeline.model import get_preset
    from llm_pipeline.train.objectives import IGNORE_INDEX, lm_head_loss

    (vocab,), (dtype,) = args.vocab, args.dtype
    hidden_size = get_preset("tiny").hidden_size
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    torch.nn.init.normal_(head.weight, std=0.02)  # the presets' initializer_range
    hidden = torch.randn(8, 512, hidden_size, requires_grad=True)
    labels = torch.full((8, 512), IGNORE_INDEX)
    trained = torch.randperm(8 * 512)[: args.rows]
    labels.view(-1)[trained] = torch.randint(0, vocab, (args.rows,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step() -> float:
        with autocast:
            if args.impl == "ours":
                loss, _, _ = lm_head_loss(head, hidden, labels, z_loss_weight=args.z_loss, trained_only=True)
            else:  # transformers' way: every position's logits, then cross-entropy that ignores the untrained
                logits = head(hidden).float()
                loss = torch.nn.functional.cross_entropy(
                    logits.view(-1, vocab), labels.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
                )
        loss.backward()
        head.weight.grad, hidden.grad = None, None
        return float(loss.detach())

    base = rss_mib()
    loss = step()
    times = []
    for _ in range(args.reps):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps({"cpu_s": statistics.median(times), "all": times, "peak_mib": peak, "loss": loss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2432, help="labelled positions (bench/sft_packing.py: ~2,400)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 50304])
    ap.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--z-loss", type=float, default=0.0)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=["ours", "baseline"], default="ours", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    print(machine_line())
    print(
        "vocab | dtype | rows | ours CPU s (median) | baseline CPU s | baseline / ours | ours / baseline peak MiB "
        "above start | ours / baseline loss"
    )
    if args.z_loss:
        print("(the baseline has no z-loss: its loss is the cross-entropy alone)")
    for vocab in args.vocab:
        for dtype in args.dtype:
            r = {}
            for impl in ("ours", "baseline"):
                cmd = [sys.executable, __file__, "--child", "--vocab", str(vocab), "--dtype", dtype, "--impl", impl]
                cmd += ["--rows", str(args.rows), "--reps", str(args.reps), "--z-loss", str(args.z_loss)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
                r[impl] = json.loads(out.strip().splitlines()[-1])
            o, b = r["ours"], r["baseline"]
            print(
                f"{vocab} | {dtype} | {args.rows} | {o['cpu_s']:.3f} | {b['cpu_s']:.3f} | "
                f"{b['cpu_s'] / o['cpu_s']:.2f}x | {o['peak_mib']:.0f} / {b['peak_mib']:.0f} | "
                f"{o['loss']:.6f} / {b['loss']:.6f}"
            )


if __name__ == "__main__":
    main()
