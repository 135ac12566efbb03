"""Forward+backward tokens/s of our LLaMA vs transformers.LlamaForCausalLM (same config, batch, dtype).

Modes: eager fp32, eager bf16 autocast, compiled bf16. Each model computes its next-token loss the way
its library trains: ours through the training objective (``CausalLMObjective``: the LM head and
cross-entropy fused chunk by chunk), transformers through ``model(ids, labels=ids).loss``. The losses
are printed and must agree (fp32: 1e-6). ``--same-loss`` instead applies one cross-entropy to both
models' full logits (the architectures alone). Both models are timed in the same run, alternating
rounds so background load hits both alike; the median round counts. MFU is the step's model FLOPs
(6·N + 12·L·H·Q·T per token) against a matmul peak measured here.

    python bench/model_step.py [--preset tiny] [--batch 4] [--seq 512] [--rounds 5] [--same-loss]
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import transformers

from _machine import machine_line  # bench/ is on sys.path when a bench runs
from llm_pipeline.checkpoint.hf import hf_config_dict
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.model.flops import flops_per_token, measure_matmul_peak
from llm_pipeline.train.objectives import IGNORE_INDEX, CausalLMObjective
from step_args import step_bench_parser


def hf_model(cfg, state):
    hc = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(cfg, torch.float32).items() if k != "dtype"})
    m = transformers.LlamaForCausalLM._from_config(hc, attn_implementation="sdpa")
    m.load_state_dict(state)
    return m


def step_fn(model, is_hf: bool, bf16: bool, same_loss: bool):
    """One forward + backward; returns the mean next-token loss (a float)."""
    objective = CausalLMObjective()

    def step(ids: torch.Tensor) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            if same_loss:
                logits = model(ids).logits if is_hf else model(ids)
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            elif is_hf:
                loss = model(ids, labels=ids).loss
            else:
                labels = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), IGNORE_INDEX)], dim=1)
                batch = {"input_ids": ids, "labels": labels}
                loss = objective(model, batch).loss_sum / objective.count(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def time_steps(step, ids, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step(ids)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = step_bench_parser(__doc__)
    ap.add_argument("--same-loss", action="store_true", help="one cross-entropy over both models' full logits")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    peaks = {"fp32": measure_matmul_peak(torch.float32), "bf16": measure_matmul_peak(torch.bfloat16)}
    print(machine_line())
    print(
        f"model: preset {args.preset}, batch {args.batch} x {args.seq}; measured matmul peak "
        f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s"
    )
    results: dict[str, dict[str, float]] = {}
    for mode in args.modes.split(","):
        compiled, bf16 = mode.startswith("compiled"), mode.endswith("bf16")
        ours = build_model(cfg, seed=0)
        theirs = hf_model(cfg, ours.state_dict())
        runners, losses = {}, {}
        for name, m, is_hf in (("ours", ours, False), ("hf", theirs, True)):
            if compiled:
                m = torch.compile(m)
            runners[name] = step_fn(m, is_hf, bf16, args.same_loss)
            runners[name](ids)  # warm-up (and compilation)
            losses[name] = runners[name](ids)
        rel = abs(losses["ours"] - losses["hf"]) / abs(losses["hf"])
        print(f"{mode:14s} loss ours {losses['ours']:.6f}, hf {losses['hf']:.6f} (rel. diff {rel:.1e})")
        times: dict[str, list[float]] = {"ours": [], "hf": []}
        for _ in range(args.rounds):
            for name, run in runners.items():
                times[name].append(time_steps(run, ids, args.steps))
        peak = peaks["bf16" if bf16 else "fp32"]
        results[mode] = {}
        for name, ts in times.items():
            tps = tokens / statistics.median(ts)
            results[mode][name] = tps
            print(f"{mode:14s} {name:4s}: {tps:9.0f} tokens/s  MFU {tps * fpt / peak:6.1%}")
        print(f"{mode:14s} ratio ours/hf: {results[mode]['ours'] / results[mode]['hf']:.2f}x")
    if "compiled-bf16" in results and "eager-bf16" in results:
        r = results["compiled-bf16"]["ours"] / results["eager-bf16"]["hf"]
        print(f"ours compiled bf16 / HF eager bf16 (HF's default experience): {r:.2f}x")


if __name__ == "__main__":
    main()
