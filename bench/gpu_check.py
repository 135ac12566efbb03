"""GPU check for an H100: full training steps of a 7B-width model in bf16 and FP8, compile off and on.

The model has the 7B preset's width (hidden 4096, SwiGLU 14336, 32/8 heads, vocab 50304) with
fewer layers so that it trains on one GPU. Each mode runs ``Trainer.train_step`` (forward,
backward, clipping, fused AdamW) on a fixed batch and prints tokens/s and MFU against the GPU's
dense bf16 peak. Targets from the training issue: bf16 MFU >= 45%, FP8 tokens/s >= 1.25x bf16.

    python bench/gpu_check.py [--layers 4] [--seq 2048] [--micro 4] [--steps 20] [--out results.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time

import torch

from _machine import machine_line  # bench/ is on sys.path when a bench runs
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.model.flops import count_parameters, flops_per_token
from llm_pipeline.train.config import CurriculumStage, TrainingConfig
from llm_pipeline.train.metrics import peak_flops
from llm_pipeline.train.objectives import CausalLMObjective
from llm_pipeline.train.parallel import DistInfo, apply_compile, apply_float8, fp8_supported
from llm_pipeline.train.trainer import Trainer
from train_step import FixedBatch  # bench/ is on sys.path when this script runs


def run_mode(cfg, *, fp8: bool, compiled: bool, seq: int, micro: int, steps: int, out_dir: str) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(cfg, device=device, seed=0)
    if fp8:
        apply_float8(model)
    if compiled:
        apply_compile(model)
    tcfg = TrainingConfig(
        global_batch_tokens=micro * seq, micro_batch_size=micro, precision="bf16", warmup_steps=0,
        lr_schedule="constant", output_dir=out_dir, max_steps=10**6,
    )  # fmt: skip
    ids = torch.randint(0, cfg.vocab_size, (micro, seq + 1), device=device)
    trainer = Trainer(
        model=model, objective=CausalLMObjective(), cfg=tcfg, info=DistInfo(device=device),
        train_source=FixedBatch({"input_ids": ids[:, :-1], "labels": ids[:, 1:]}),
        curriculum=[CurriculumStage(step=0, seq_len=seq)], fp8=fp8,
    )  # fmt: skip
    trainer.prepare()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # warm-up, compilation, allocator
        trainer.train_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        m = trainer.train_step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tps = micro * seq / dt
    peak, _ = peak_flops(device, precision="bf16", fp8=False)
    result = {
        "mode": f"{'fp8' if fp8 else 'bf16'}{' compiled' if compiled else ''}",
        "tokens_per_s": tps,
        "mfu_vs_bf16_peak": tps * flops_per_token(cfg, seq) / peak,
        "step_s": dt,
        "loss": m["loss"],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default="bf16,bf16-compiled,fp8,fp8-compiled")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    print(machine_line())
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; run this on an H100 (see docs/benchmarks.md)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cfg = get_preset("7b", num_hidden_layers=args.layers)
    name = torch.cuda.get_device_name(device)
    peak, src = peak_flops(device, precision="bf16", fp8=False)
    print(f"device: {name}; torch {torch.__version__}; peak {peak / 1e12:.0f} TFLOP/s ({src})")
    n = count_parameters(cfg) / 1e9
    print(f"model: 7B width, {args.layers} layers, {n:.2f}B params; batch {args.micro} x {args.seq}")
    fp8_ok, why = fp8_supported(device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            fp8 = mode.startswith("fp8")
            if fp8 and not fp8_ok:
                print(f"{mode:16s} skipped: {why}")
                continue
            r = run_mode(
                cfg, fp8=fp8, compiled=mode.endswith("compiled"), seq=args.seq, micro=args.micro,
                steps=args.steps, out_dir=tmp,
            )  # fmt: skip
            results.append(r)
            print(
                f"{r['mode']:16s} {r['tokens_per_s']:10,.0f} tok/s  MFU {r['mfu_vs_bf16_peak']:6.1%}  "
                f"{r['step_s'] * 1e3:7.1f} ms/step  mem {r['peak_mem_gib']:5.1f} GiB  loss {r['loss']:.3f}",
                flush=True,
            )
    by = {r["mode"]: r for r in results}
    best_bf16 = max((r for k, r in by.items() if k.startswith("bf16")), key=lambda r: r["tokens_per_s"], default=None)
    best_fp8 = max((r for k, r in by.items() if k.startswith("fp8")), key=lambda r: r["tokens_per_s"], default=None)
    if best_bf16:
        ok = best_bf16["mfu_vs_bf16_peak"] >= 0.45
        print(f"target bf16 MFU >= 45%: {best_bf16['mfu_vs_bf16_peak']:.1%} ({'met' if ok else 'NOT met'})")
    if best_bf16 and best_fp8:
        ratio = best_fp8["tokens_per_s"] / best_bf16["tokens_per_s"]
        print(f"target FP8 >= 1.25x bf16 tokens/s: {ratio:.2f}x ({'met' if ratio >= 1.25 else 'NOT met'})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
