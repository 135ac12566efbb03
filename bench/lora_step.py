"""A LoRA training step vs a full fine-tuning step of the same model and batch on CPU: time, memory, checkpoint.

Every variant runs the same step: forward, cross-entropy, backward, gradient clipping, fused AdamW over
the trainable parameters, zero_grad. ``full`` trains every parameter; ``lora-rN`` is the LoRA stage's
model (peft adapters on all seven projections through ``apply_lora``, base frozen, adapters fp32);
``lora-rN-bf16base`` also stores the frozen base in bf16 (bf16 modes only).

- Step time: all variants live in one process and alternate rounds, so background load hits them alike.
  Reported: the fastest round (load only ever adds time). Absolute times still move with the load of a
  shared machine; compare the ratios.
- Peak memory, each variant in its own subprocess, two ways (a CPU build of torch has no allocator peak
  counter): *tensors* = the peak of live tensor storage during a step (weights + optimizer state held
  between steps, plus what the step allocates, tracked op by op with a dispatch mode: exact, allocator
  independent); *RSS* = the process's peak RSS (``VmHWM``, reset after imports through
  ``/proc/self/clear_refs``) minus its RSS at that point: what the OS saw, malloc caching included.
- Checkpoint size: a training checkpoint (``CheckpointManager``: model + optimizer after one step) of a
  full fine-tuning run, of a LoRA run with its frozen base, and without it (``save_frozen_params=False``).

    python bench/lora_step.py [--preset tiny] [--batch 4] [--seq 512] [--rounds 5] [--steps 3] [--ranks 64,16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from _machine import machine_line  # bench/ is on sys.path when a bench runs
from llm_pipeline.checkpoint.dcp import CheckpointManager
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.train.lora import LoRAConfig, apply_lora, trainable_parameter_count
from step_args import step_bench_parser

# DCP on one process without a process group is intended here (as in llm_pipeline.checkpoint.dcp).
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

MiB = 1024**2


def build(cfg, variant: str, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The model of one variant, from shared weights (``state``) or the seed-0 init."""
    model = build_model(cfg, seed=0) if state is None else build_model(cfg, seed=None, init=False)
    if state is not None:
        model.load_state_dict(state)
    if variant != "full":
        rank = int(variant.split("-")[1].removeprefix("r"))
        apply_lora(model, LoRAConfig(r=rank, base_dtype="bfloat16" if variant.endswith("bf16base") else "float32"))
    return model


def make_step(
    model: torch.nn.Module, ids: torch.Tensor, bf16: bool
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def variants_for(mode: str, ranks: list[int]) -> list[str]:
    out = ["full", *(f"lora-r{r}" for r in ranks)]
    if mode.endswith("bf16"):
        out.append(f"lora-r{ranks[0]}-bf16base")
    return out


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Current RSS in bytes, after resetting the kernel's peak-RSS mark (VmHWM) to it (Linux >= 4.0), so
    the peak read afterwards is this variant's own, not the transient peak of importing torch and peft."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_bytes("VmRSS")


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage created under it and still alive, and their peak (weakref-tracked)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def child_memory(preset: str, variant: str, mode: str, batch: int, seq: int, steps: int) -> None:
    """Subprocess entry: this variant's peak memory over ``steps`` steps, as JSON on stdout."""
    cfg = get_preset(preset)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    floor = reset_peak_rss()
    model = build(cfg, variant)
    step, opt = make_step(model, ids, mode.endswith("bf16"))
    for _ in range(steps):
        step()
    rss = proc_status_bytes("VmHWM") - floor
    # Tensor peak of one more step: weights and optimizer state held between steps (gradients are
    # freed by zero_grad), plus the peak of what the step allocates (activations, gradients, temporaries).
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    for state in opt.state.values():
        held.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()})
    tracker = LiveTensorBytes()
    with tracker:
        step()
    tensors = sum(held.values()) + tracker.peak
    print(
        json.dumps({"rss_mib": rss / MiB, "tensor_mib": tensors / MiB, "trainable": trainable_parameter_count(model)})
    )


def memory(args, mode: str, variant: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", variant, "--preset", args.preset, "--modes", mode]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def timing(cfg, args, mode: str, variants: list[str]) -> dict[str, float]:
    """Per variant: the fastest round's wall seconds per step (background load only ever adds time)."""
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    state = build_model(cfg, seed=0).state_dict()
    steps = {v: make_step(build(cfg, v, state), ids, mode.endswith("bf16"))[0] for v in variants}
    for run in steps.values():  # warm-up
        run()
        run()
    wall: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, run in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run()
            wall[v].append((time.perf_counter() - t0) / args.steps)
    return {v: min(ts) for v, ts in wall.items()}


def checkpoint_sizes(preset: str, rank: int) -> dict[str, float]:
    """MiB of a checkpoint after one step (CheckpointManager): full FT, LoRA with its base, LoRA trainable only."""
    cfg = get_preset(preset)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant, frozen in (
            ("full_ft", "full", True),
            ("lora_with_base", f"lora-r{rank}", True),
            ("lora_trainable_only", f"lora-r{rank}", False),
        ):
            model = build(cfg, variant)
            step, opt = make_step(model, ids, bf16=False)
            step()
            manager = CheckpointManager(Path(tmp) / name)
            path = manager.save(
                1, model=model, optimizer=opt, trainer_state={}, rank_state={}, save_frozen_params=frozen
            )
            sizes[name] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / MiB
    return sizes


def main() -> None:
    ap = step_bench_parser(__doc__)
    ap.set_defaults(modes="eager-fp32,eager-bf16")
    ap.add_argument("--ranks", default="64,16", help="LoRA ranks to compare against full fine-tuning")
    ap.add_argument("--ckpt", default="debug:8,tiny:64,tiny:16", help="preset:rank pairs for checkpoint sizes")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one variant's memory, in a subprocess
    args = ap.parse_args()
    if args.child:
        child_memory(args.preset, args.child, args.modes, args.batch, args.seq, args.steps)
        return

    cfg = get_preset(args.preset)
    ranks = [int(r) for r in args.ranks.split(",")]
    print(machine_line())
    print(f"model: preset {args.preset}, batch {args.batch} x {args.seq}, {args.rounds} rounds of {args.steps} steps")
    for mode in args.modes.split(","):
        variants = variants_for(mode, ranks)
        secs = timing(cfg, args, mode, variants)
        full_mem = memory(args, mode, "full")
        for v in variants:
            mem = full_mem if v == "full" else memory(args, mode, v)
            print(
                f"{mode:10s} {v:18s} trainable {mem['trainable']:>11,}  step {secs[v] * 1000:7.1f} ms "
                f"({secs['full'] / secs[v]:.2f}x full's speed)  peak tensors {mem['tensor_mib']:6.1f} MiB "
                f"({mem['tensor_mib'] / full_mem['tensor_mib']:.2f}x full)  peak RSS +{mem['rss_mib']:6.1f} MiB",
                flush=True,
            )
    for spec in filter(None, args.ckpt.split(",")):
        preset, rank = spec.split(":")
        s = checkpoint_sizes(preset, int(rank))
        print(
            f"checkpoint {preset} r={rank}: full FT {s['full_ft']:.2f} MiB, "
            f"LoRA with base {s['lora_with_base']:.2f} MiB, "
            f"LoRA trainable only {s['lora_trainable_only']:.2f} MiB "
            f"({s['full_ft'] / s['lora_trainable_only']:.0f}x smaller than full FT)",
            flush=True,
        )


if __name__ == "__main__":
    main()
