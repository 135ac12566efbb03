"""The 7B memory plan: the production stage configs traced on 8 x 80 GB, and torchtitan's Llama-3-8B setting.

Each row is one training step traced on fake tensors and a fake process group (llm_pipeline.memplan,
what ``llm-pipeline preflight --trace-memory`` runs): rank 0's peak by column, in GiB, without the
1 GiB CUDA overhead the plan adds. Nothing is allocated; takes a minute or two on a CPU.

    python bench/memory_plan.py [--gpus 8] [--gpu-memory-gib 80] [--configs configs/pretrain.yaml ...]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from llm_pipeline.hardware import probe_environment
from llm_pipeline.memplan import plan_memory, trace_step
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.preflight import plan_run, stage_step_shape
from llm_pipeline.train.objectives import CausalLMObjective

CONFIGS = ["configs/pretrain.yaml", "configs/sft.yaml", "configs/lora_finetune.yaml", "configs/dpo.yaml"]


def row(label: str, shape, result_or_trace, gpu: float | None = None) -> str:
    t = getattr(result_or_trace, "trace", result_or_trace)
    g = t.as_gib()
    fp8 = f"fp8 {shape.fp8_recipe}" if shape.fp8 else "bf16" if shape.precision == "bf16" else shape.precision
    cells = [
        label,
        f"{shape.world_size}",
        f"{shape.micro_batch} x {shape.seq_len}",
        fp8,
        shape.activation_checkpointing,
    ]
    cells += [f"{g[c]:.1f}" for c in ("params", "grads", "optimizer", "activations", "collectives", "peak")]
    if gpu is not None:
        fits = result_or_trace.fits
        fix = result_or_trace.largest_micro_batch
        cells.append("yes" if fits else f"no (micro-batch {fix})" if fix else "no")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0)
    ap.add_argument("--configs", nargs="*", default=CONFIGS)
    ap.add_argument("--layers", type=int, default=2, help="blocks traced (and twice that), scaled per block")
    args = ap.parse_args()
    env = probe_environment(gpus=args.gpus, gpu_memory_gib=args.gpu_memory_gib, gpu_capability="9.0")
    head = "| stage | GPUs | micro-batch | precision | AC | params | grads | optimizer | activations | collectives "
    head += "| peak |"
    print(head + " fits |")
    print("|" + "---|" * (head.count("|")))
    for path in args.configs:
        for sp in plan_run(path).stages:
            if sp.model is None:  # starts from an earlier stage's export, not written yet: the 7B preset
                sp.model = get_preset("7b")
            t = sp.cfg.training
            objective = CausalLMObjective(z_loss_weight=0.0, chunk_tokens=t.loss_chunk_tokens)
            shape, _ = stage_step_shape(sp, env, args.gpus)
            label = f"{sp.name} ({path})"
            transform = sp.stage.transform
            try:
                transform(build_model(get_preset("debug"), device="meta"))
            except OSError:  # SFT adds its chat tokens from a tokenizer an earlier stage writes
                transform, label = None, label + ", vocabulary not extended (no tokenizer yet)"
            result = plan_memory(
                sp.model, shape, t, objective, gpu_memory_gib=args.gpu_memory_gib,
                transform=transform, fp8_filter=sp.stage.fp8_filter, layers=args.layers,
            )  # fmt: skip
            print(row(label, shape, result, args.gpu_memory_gib), flush=True)
    # torchtitan's published Llama-3.1-8B row (benchmarks/llama3_h100_202412_torchtitan.md, Table 1): 8 GPUs,
    # local batch 2 x 8192, selective AC; the same shapes on our 7B (vocab 50304 instead of 128256).
    sp = plan_run("configs/pretrain.yaml").stages[0]
    base, _ = stage_step_shape(sp, env, 8)
    t = sp.cfg.training
    objective = CausalLMObjective(z_loss_weight=0.0, chunk_tokens=t.loss_chunk_tokens)
    for fp8 in (False, True):
        shape = replace(base, micro_batch=2, seq_len=8192, activation_checkpointing="selective", fp8=fp8)
        for name in ("7b", "llama3-8b-shape"):
            cfg = get_preset("7b") if name == "7b" else get_preset("7b", vocab_size=128256)
            tr = trace_step(cfg, shape, t, objective, layers=args.layers)
            print(row(f"torchtitan setting, {name}", shape, tr) + " |", flush=True)


if __name__ == "__main__":
    main()
