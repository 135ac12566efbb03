"""Full training step tokens/s and MFU: our Trainer vs a plain transformers LlamaForCausalLM + AdamW loop.

Both sides do the same work per step on the same config, weights and batch: forward, cross-entropy,
backward, gradient-norm clipping, AdamW (fused on both), zero_grad. Ours runs
``Trainer.train_step`` (the loop every stage uses: token-normalised accumulation, non-finite
check, schedule); the baseline is the loop people write around HF models. Rounds alternate
between the two so background load hits both alike; the median round counts. MFU is
6·N + 12·L·H·Q·T FLOPs per token against a matmul peak measured in the same run.

    python bench/train_step.py [--preset tiny] [--batch 4] [--seq 512] [--rounds 5] [--modes ...]
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time

import torch

from _machine import machine_line  # bench/ is on sys.path when a bench runs
from llm_pipeline.checkpoint.hf import hf_config_dict
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.model.flops import flops_per_token, measure_matmul_peak
from llm_pipeline.train.config import CurriculumStage, TrainingConfig
from llm_pipeline.train.objectives import CausalLMObjective
from llm_pipeline.train.parallel import apply_compile
from llm_pipeline.train.trainer import Trainer
from step_args import step_bench_parser


class FixedBatch:
    """A batch source that serves the same batch forever (the benchmark measures compute, not data)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.batch

    def set_seq_len(self, seq_len: int, micro_batch_size: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def ours_step(cfg, state, ids, bf16: bool, compiled: bool, out_dir: str):
    model = build_model(cfg, seed=None, init=False)
    model.load_state_dict(state)
    if compiled:
        apply_compile(model)
    b, t = ids.shape[0], ids.shape[1] - 1
    tcfg = TrainingConfig(
        global_batch_tokens=b * t, micro_batch_size=b, precision="bf16" if bf16 else "fp32",
        warmup_steps=0, lr_schedule="constant", output_dir=out_dir, max_steps=10**6,
    )  # fmt: skip
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    trainer = Trainer(
        model=model, objective=CausalLMObjective(), train_source=FixedBatch(batch), cfg=tcfg,
        curriculum=[CurriculumStage(step=0, seq_len=t)],
    )  # fmt: skip
    trainer.prepare()
    return trainer.train_step


def hf_step(cfg, state, ids, bf16: bool, compiled: bool):
    import transformers

    hc = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(cfg, torch.float32).items() if k != "dtype"})
    model = transformers.LlamaForCausalLM._from_config(hc, attn_implementation="sdpa")
    model.load_state_dict(state)
    if compiled:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = step_bench_parser(__doc__).parse_args()

    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    peaks = {"fp32": measure_matmul_peak(torch.float32), "bf16": measure_matmul_peak(torch.bfloat16)}
    print(machine_line())
    print(
        f"model: preset {args.preset}, batch {args.batch} x {args.seq}; measured matmul peak "
        f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s"
    )
    state = build_model(cfg, seed=0).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            compiled, bf16 = mode.startswith("compiled"), mode.endswith("bf16")
            runners = {
                "ours": ours_step(cfg, state, ids, bf16, compiled, tmp),
                "hf": hf_step(cfg, state, ids, bf16, compiled),
            }
            for run in runners.values():  # warm-up (and compilation)
                run()
                run()
            times: dict[str, list[float]] = {"ours": [], "hf": []}
            for _ in range(args.rounds):
                for name, run in runners.items():
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        run()
                    times[name].append((time.perf_counter() - t0) / args.steps)
            peak = peaks["bf16" if bf16 else "fp32"]
            tps = {name: tokens / statistics.median(ts) for name, ts in times.items()}
            for name, v in tps.items():
                print(f"{mode:14s} {name:4s}: {v:9.0f} tokens/s  MFU {v * fpt / peak:6.1%}")
            print(f"{mode:14s} ratio ours/hf: {tps['ours'] / tps['hf']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
