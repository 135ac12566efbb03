"""GPU check: the CUDA paths a cluster run takes, timed against torchtitan's published Llama-3.1-8B figures.

One command on a GPU machine. Every mode runs ``Trainer.train_step`` (forward, backward, clipping,
fused AdamW) on a model built the way a run builds it (``build_training_model``: float8 conversion,
selective activation checkpointing, per-block ``torch.compile``, FSDP2 over all visible GPUs when
there are several: the script relaunches itself under torchrun). Modes (``--modes``, comma-separated):

    bf16                      eager, plain causal SDPA
    bf16+compile              compiled blocks
    bf16+compile+flex         packed documents: flex attention with a block mask (CUDA)
    fp8-tensorwise+compile    torchao float8, tensorwise scales, float8 FSDP2 all-gather
    fp8-rowwise+compile       torchao float8, rowwise scales (high-precision all-gather)

It prints tokens/s per GPU and MFU (against the dense bf16 peak) next to torchtitan's published
8 x H100 figures for Llama-3.1-8B with FSDP, local batch 2 x 8192 and selective AC: 6,667 tok/s/GPU
with compile (bf16), 8,532 with compile + float8 (benchmarks/llama3_h100_202412_torchtitan.md). The
default shape is theirs: the full 7B (32 blocks; 4 blocks on fewer than 4 GPUs, where 7B with AdamW
does not fit), micro-batch 2 x 8192.

``--dry-run`` runs every mode on the CPU with a tiny model (FP8 through torchao's emulation, compile
skipped: inductor on a CPU takes minutes), so a test can check that the script has not rotted.

    python bench/gpu_check.py [--modes ...] [--layers N] [--seq 8192] [--micro 2] [--steps 20] [--out r.json]
    python bench/gpu_check.py --dry-run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llm_pipeline.model import get_preset
from llm_pipeline.model.flops import count_parameters, flops_per_token
from llm_pipeline.train.config import CurriculumStage, ParallelConfig, TrainingConfig
from llm_pipeline.train.metrics import peak_flops
from llm_pipeline.train.model_setup import build_training_model
from llm_pipeline.train.objectives import CausalLMObjective
from llm_pipeline.train.parallel import DistInfo, fp8_supported, init_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_line
from train_step import FixedBatch

# torchtitan, Llama-3.1-8B, 8 x H100 (96 GB, 500 W), FSDP, local batch 2 x 8192, selective AC (Table 1).
TORCHTITAN_TOK_S = {"bf16+compile": 6667.0, "fp8-tensorwise+compile": 8532.0, "bf16": 5762.0}
MODES = ("bf16", "bf16+compile", "bf16+compile+flex", "fp8-tensorwise+compile", "fp8-rowwise+compile")


@dataclass(frozen=True)
class Mode:
    name: str
    fp8: bool
    recipe: str
    compile: bool
    flex: bool

    @classmethod
    def parse(cls, name: str) -> Mode:
        parts = name.split("+")
        precision, opts = parts[0], set(parts[1:])
        if precision not in ("bf16", "fp8-tensorwise", "fp8-rowwise") or not opts <= {"compile", "flex"}:
            raise SystemExit(f"gpu_check: unknown mode {name!r}; choose from {', '.join(MODES)}")
        fp8 = precision.startswith("fp8")
        return cls(
            name, fp8, precision.removeprefix("fp8-") if fp8 else "tensorwise", "compile" in opts, "flex" in opts
        )


def batch(vocab: int, micro: int, seq: int, *, documents: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens; with ``documents``, rows packed from documents of 256..2048 tokens (flex's block mask)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (micro, seq + 1), generator=g)
    out = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    if documents:
        lengths = torch.randint(min(256, seq), min(2048, seq) + 1, (seq,), generator=g)
        doc = torch.repeat_interleave(torch.arange(seq), lengths)[:seq]
        out["document_ids"] = doc.expand(micro, seq).contiguous()
    return {k: v.to(device) for k, v in out.items()}


def run_mode(mode: Mode, cfg, info: DistInfo, args: argparse.Namespace, out_dir: str) -> dict:
    dry = args.dry_run
    pcfg = ParallelConfig(
        activation_checkpointing=args.ac, compile=mode.compile and not dry, fp8=mode.fp8 or False,
        fp8_recipe=mode.recipe, fp8_emulate=mode.fp8 and dry, device=info.device.type,  # type: ignore[arg-type]
    )  # fmt: skip
    precision = "bf16"
    torch.manual_seed(0)
    model = build_training_model(cfg, pcfg, info, precision=precision, fp8=mode.fp8, seed=0)
    tcfg = TrainingConfig(
        global_batch_tokens=args.micro * args.seq * info.world_size, micro_batch_size=args.micro,
        precision=precision, warmup_steps=0, lr_schedule="constant", output_dir=out_dir, max_steps=10**6,
        logging_steps=10**6,
    )  # fmt: skip
    data = batch(cfg.vocab_size, args.micro, args.seq, documents=mode.flex, device=info.device)
    trainer = Trainer(
        model=model, objective=CausalLMObjective(), cfg=tcfg, info=info, train_source=FixedBatch(data),
        curriculum=[CurriculumStage(step=0, seq_len=args.seq)], fp8=mode.fp8, lock_output_dir=False,
    )  # fmt: skip
    trainer.prepare()
    cuda = info.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):  # compilation, allocator, float8 scales
        trainer.train_step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        m = trainer.train_step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tps = args.micro * args.seq / dt  # per GPU: each rank runs its own micro-batch
    peak, source = peak_flops(info.device, precision="bf16", fp8=False)
    result = {
        "mode": mode.name + dry_run_note(mode, dry),
        "tokens_per_s_per_gpu": tps,
        "mfu_vs_bf16_peak": tps * flops_per_token(cfg, args.seq) / peak,
        "peak_source": source,
        "step_s": dt,
        "loss": m["loss"],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "torchtitan_tok_s": TORCHTITAN_TOK_S.get(mode.name),
    }
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def dry_run_note(mode: Mode, dry: bool) -> str:
    """What a CPU dry run did instead of the GPU path."""
    notes = [n for n, on in (("fp8 emulated", mode.fp8), ("compile skipped", mode.compile),
                             ("segments, not flex", mode.flex)) if on and dry]  # fmt: skip
    return f" [{', '.join(notes)}]" if notes else ""


def relaunch_under_torchrun(n: int) -> int:
    """FSDP2 over all visible GPUs: run this script again as ``n`` torchrun ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *sys.argv]
    return subprocess.call(cmd, env={**os.environ, "GPU_CHECK_CHILD": "1"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    ap.add_argument("--layers", type=int, help="blocks of the 7B (default 32 on >= 4 GPUs, else 4)")
    ap.add_argument("--seq", type=int, default=8192, help="tokens per row (torchtitan's 8B setting: 8192)")
    ap.add_argument("--micro", type=int, default=2, help="rows per GPU per step (torchtitan's 8B setting: 2)")
    ap.add_argument("--ac", default="selective", choices=["none", "selective", "full"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", help="also write the results as JSON here (rank 0)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model: check the script, time nothing real")
    args = ap.parse_args(argv)
    for name in args.modes.split(","):
        Mode.parse(name)  # fail before any work
    if args.dry_run:
        args.seq, args.micro = min(args.seq, 64), min(args.micro, 2)
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU visible; run this on an H100 node (or --dry-run on a CPU)", file=sys.stderr)
            return 2
        n = torch.cuda.device_count()
        if n > 1 and "LOCAL_RANK" not in os.environ:
            return relaunch_under_torchrun(n)
    info = init_distributed("cpu" if args.dry_run else "cuda")
    layers = args.layers or (32 if info.world_size >= 4 else 4)
    cfg = get_preset("debug") if args.dry_run else get_preset("7b", num_hidden_layers=layers)
    say = print if info.is_main else (lambda *a, **k: None)
    say(machine_line())
    device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "CPU (dry run)"
    peak, src = peak_flops(info.device, precision="bf16", fp8=False)
    say(f"device: {info.world_size} x {device_name}; torch {torch.__version__}; "
        f"bf16 peak {peak / 1e12:.1f} TFLOP/s ({src})")  # fmt: skip
    say(f"model: {count_parameters(cfg) / 1e9:.2f}B params ({cfg.num_hidden_layers} blocks); "
        f"{args.micro} x {args.seq} tokens per GPU; AC {args.ac}; FSDP2 over {info.world_size} rank(s)")  # fmt: skip
    fp8_ok, why = (True, "") if args.dry_run else fp8_supported(info.device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.modes.split(","):
            mode = Mode.parse(name)
            if mode.fp8 and not fp8_ok:
                say(f"{name:26s} skipped: {why}")
                continue
            r = run_mode(mode, cfg, info, args, tmp)
            results.append(r)
            ref = r["torchtitan_tok_s"]
            vs = f"  torchtitan 8B {ref:,.0f} ({r['tokens_per_s_per_gpu'] / ref:.2f}x)" if ref else ""
            mem = f"  mem {r['peak_mem_gib']:5.1f} GiB" if r["peak_mem_gib"] is not None else ""
            say(f"{r['mode']:26s} {r['tokens_per_s_per_gpu']:10,.0f} tok/s/GPU  MFU {r['mfu_vs_bf16_peak']:6.1%}  "
                f"{r['step_s'] * 1e3:8.1f} ms/step{mem}  loss {r['loss']:.3f}{vs}", flush=True)  # fmt: skip

    def fastest(prefix: str) -> dict | None:
        runs = [r for r in results if r["mode"].startswith(prefix)]
        return max(runs, key=lambda r: r["tokens_per_s_per_gpu"], default=None)

    best = {p: fastest(p) for p in ("bf16", "fp8")}
    if best["bf16"]:
        mfu = best["bf16"]["mfu_vs_bf16_peak"]
        say(f"target bf16 MFU >= 45%: {mfu:.1%} ({'met' if mfu >= 0.45 else 'NOT met'})")
    if best["bf16"] and best["fp8"]:
        ratio = best["fp8"]["tokens_per_s_per_gpu"] / best["bf16"]["tokens_per_s_per_gpu"]
        theirs = TORCHTITAN_TOK_S["fp8-tensorwise+compile"] / TORCHTITAN_TOK_S["bf16+compile"]
        say(f"target FP8 >= 1.25x bf16 tokens/s: {ratio:.2f}x ({'met' if ratio >= 1.25 else 'NOT met'}; "
            f"torchtitan: {theirs:.2f}x)")  # fmt: skip
    if info.is_main:
        say("torchtitan: Llama-3.1-8B (vocab 128256: more FLOPs per token than our 7B), 8 x H100 96 GB at 500 W")
        if args.out:
            Path(args.out).write_text(
                json.dumps({"device": device_name, "args": vars(args), "results": results}, indent=2)
            )
    if info.distributed:
        torch.distributed.destroy_process_group()
    return 0


from llm_pipeline.train.trainer import Trainer  # noqa: E402  (after the helpers: heavy import)

if __name__ == "__main__":
    sys.exit(main())
