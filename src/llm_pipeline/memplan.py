"""A memory plan for N GPUs: one training step traced at full size on fake tensors and a fake process group.

Nothing is allocated: the model is built on ``meta``, parallelised exactly as a run would be
(:func:`llm_pipeline.train.parallel.parallelize`: float8, activation checkpointing, FSDP2 over a fake
process group of ``world_size`` ranks), materialised under ``FakeTensorMode`` and stepped twice (the
second step has the AdamW state) under PyTorch's ``FSDPMemTracker``, which sorts every live tensor
of this rank into parameters, gradients, optimizer state, activations/temporaries and collective
buffers and keeps the peak. torchtitan estimates memory the same way (scripts/estimate).

What the trace does not see: the CUDA context and caching-allocator fragmentation (``overhead_gib``,
added to the total), ``torch.compile`` (traced eager, as torchtitan does; compile usually lowers the
peak), and flex attention's block mask (attention is traced as causal SDPA). Tensors are traced on the
CPU device: the same shapes and dtypes a GPU holds.

A full trace of a large model runs every op of every block, so :func:`trace_step` can trace fewer
blocks (``layers``) twice and extrapolate each category linearly in the number of blocks; the test
suite checks that against a full trace.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llm_pipeline.model.flops import GiB
from llm_pipeline.model.llama import ModelConfig
from llm_pipeline.train.config import ParallelConfig, TrainingConfig

# The tracker's categories (FSDPMemTracker; plain MemTracker names for one rank) -> the plan's columns.
_COLUMNS = {
    "Sharded Param": "params",
    "Unsharded Param": "params",
    "Buffer": "params",
    "Parameter": "params",
    "Sharded Grad": "grads",
    "Unsharded Grad": "grads",
    "Gradient": "grads",
    "OptState": "optimizer",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "activations",
    "Inputs": "activations",
    "All Gather": "collectives",
    "Reduce Scatter": "collectives",
    "Other": "activations",
}
COLUMNS = ("params", "grads", "optimizer", "activations", "collectives")
PER_BLOCK = ("params", "grads", "optimizer", "activations")  # extrapolated per block (collectives are not)
OVERHEAD_GIB = 1.0  # CUDA context, NCCL buffers, workspaces: outside any tensor the trace sees
FIT_FRACTION = 0.95  # the caching allocator's fragmentation: plan to 95 % of the GPU (as the formula does)


@dataclass(frozen=True)
class StepShape:
    """What one rank runs: the setting a plan is made for."""

    world_size: int
    micro_batch: int
    seq_len: int
    precision: str = "bf16"
    activation_checkpointing: str = "none"
    fp8: bool = False
    fp8_recipe: str = "tensorwise"
    fsdp: bool = True
    reshard_after_forward: bool = True


@dataclass(frozen=True)
class MemoryTrace:
    """Per-rank peak tensor memory in bytes, by what holds it, at the peak of one training step."""

    params: float
    grads: float
    optimizer: float
    activations: float  # saved activations, AC recomputation, backward temporaries, the batch
    collectives: float  # FSDP all-gather outputs and reduce-scatter inputs in flight
    layers_traced: int  # blocks traced (fewer than the model's: extrapolated per block)
    layers: int

    @property
    def peak(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.collectives

    def as_gib(self) -> dict[str, float]:
        return {c: getattr(self, c) / GiB for c in (*COLUMNS, "peak")}


def _columns(snapshot: dict[str, int]) -> dict[str, float]:
    out = dict.fromkeys(COLUMNS, 0.0)
    for key, value in snapshot.items():
        if key != "Total":
            out[_COLUMNS.get(key, "activations")] += value
    return out


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A process group of ``world_size`` ranks in this process (rank 0); collectives do nothing."""
    if dist.is_initialized():
        raise RuntimeError("a memory trace needs its own fake process group: run it outside a distributed job")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


ModelTransform = Callable[[nn.Module], nn.Module]
ModuleFilter = Callable[[nn.Module, str], bool]


def build_parallel_model(
    model_cfg: ModelConfig,
    shape: StepShape,
    *,
    transform: ModelTransform | None = None,
    fp8_filter: ModuleFilter | None = None,
    device: torch.device | str = "cpu",
    materialize: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> nn.Module:
    """The model as this rank of ``shape.world_size`` holds it: built on meta, parallelised, then materialised.

    Materialised inside ``materialize()`` (``FakeTensorMode`` for a trace: the device mesh must be built
    outside it); with real tensors (the validation run) the weights are uninitialised memory of the
    right size, which is all memory needs.
    """
    from llm_pipeline.model import build_model
    from llm_pipeline.train.parallel import DistInfo, parallelize

    dev = torch.device(device)
    model = build_model(model_cfg, device="meta")
    if transform is not None:
        model = transform(model)
    pcfg = ParallelConfig(
        fsdp=shape.fsdp,
        reshard_after_forward=shape.reshard_after_forward,
        activation_checkpointing=shape.activation_checkpointing,  # type: ignore[arg-type]
        compile=False,
        fp8=shape.fp8,
        fp8_recipe=shape.fp8_recipe,  # type: ignore[arg-type]
        device="cpu",
    )
    info = DistInfo(rank=dist.get_rank() if dist.is_initialized() else 0, world_size=shape.world_size, device=dev)
    parallelize(model, pcfg, info=info, precision=shape.precision, fp8=shape.fp8, fp8_filter=fp8_filter)
    with materialize():
        model.to_empty(device=dev)
        if shape.world_size == 1:
            # one process trains fp32 weights (bf16 is autocast's compute dtype), as build_training_model does
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                        p.data = p.data.float()
    return model.train()


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: Callable[[nn.Module, dict[str, torch.Tensor]], Any],
    batch: dict[str, torch.Tensor],
    *,
    precision: str,
    max_grad_norm: float,
) -> None:
    """The trainer's step without its bookkeeping: forward + backward, clip, AdamW, zero grads."""
    from llm_pipeline.train.trainer import training_autocast

    with training_autocast(model, precision, next(model.parameters()).device):
        out = objective(model, batch)
    out.loss_sum.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def token_batch(vocab_size: int, rows: int, seq_len: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    ids = torch.randint(0, vocab_size, (rows, seq_len + 1), device=device)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def measure_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[], None],
    batch: dict[str, torch.Tensor],
) -> dict[str, float]:
    """Peak bytes per column over the second of two steps (the first has no AdamW state yet)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        tracker: Any = FSDPMemTracker(model, optimizer)
        tracker.track_inputs(tuple(batch.values()))
    else:
        tracker = MemTracker()
        tracker.track_external(model, optimizer, *batch.values())
    with tracker:
        step()
        tracker.reset_mod_stats()
        step()
    peak = tracker.get_tracker_snapshot("peak")
    snap = max(peak.values(), key=lambda s: s.get("Total", 0))
    return _columns(snap)


def _trace_once(
    model_cfg: ModelConfig,
    shape: StepShape,
    training: TrainingConfig,
    objective: Callable[[nn.Module, dict[str, torch.Tensor]], Any],
    transform: ModelTransform | None,
    fp8_filter: ModuleFilter | None,
) -> dict[str, float]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    gc.collect()
    fake = FakeTensorMode(allow_non_fake_inputs=True)  # the meta model, built outside (its device mesh)
    with fake_process_group(shape.world_size):
        model = build_parallel_model(
            model_cfg, shape, transform=transform, fp8_filter=fp8_filter, materialize=lambda: fake
        )
        with fake:
            return _fake_step(model, shape, training, objective, model_cfg.vocab_size)


def _fake_step(
    model: nn.Module,
    shape: StepShape,
    training: TrainingConfig,
    objective: Callable[[nn.Module, dict[str, torch.Tensor]], Any],
    vocab_size: int,
) -> dict[str, float]:
    optimizer = step_optimizer(model, training)
    batch = token_batch(vocab_size, shape.micro_batch, shape.seq_len)

    def step() -> None:
        training_step(
            model, optimizer, objective, batch, precision=shape.precision, max_grad_norm=training.max_grad_norm
        )
        _after_step(model, shape)

    return measure_step(model, optimizer, step, batch)


def step_optimizer(model: nn.Module, training: TrainingConfig) -> torch.optim.Optimizer:
    """The run's AdamW (same groups and state), stepping one tensor at a time.

    A GPU run uses the fused kernel, which allocates no temporaries; under ``FakeTensorMode`` the fused
    CPU kernel reports temporaries far above its state (10 GiB for two 7B blocks on 8 ranks), so the
    trace (and its validation run) use the per-tensor loop, whose temporaries are one shard at a time.
    """
    from llm_pipeline.train.optim import build_optimizer

    optimizer = build_optimizer(model, training)
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = False, False
    optimizer.defaults["fused"] = False
    return optimizer


def measure_rank_peak(
    model_cfg: ModelConfig,
    shape: StepShape,
    training: TrainingConfig,
    objective: Callable[[nn.Module, dict[str, torch.Tensor]], Any],
    *,
    seed: int = 0,
) -> dict[str, float]:
    """This rank's measured peaks on real tensors, inside a real process group of ``shape.world_size`` ranks.

    Two measurements of the same step with real weights and real collectives (gloo on CPU), what a trace
    is validated against: the tracker's columns (the trace's own accounting, on real tensors), and
    ``allocator``: the peak of the CPU allocator's live bytes (profiler allocation events, every
    allocation whoever makes it) on top of what is live between steps.
    """
    torch.manual_seed(seed)
    model = build_parallel_model(model_cfg, shape)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    optimizer = step_optimizer(model, training)
    batch = token_batch(model_cfg.vocab_size, shape.micro_batch, shape.seq_len)

    def step() -> None:
        training_step(
            model, optimizer, objective, batch, precision=shape.precision, max_grad_norm=training.max_grad_norm
        )
        _after_step(model, shape)

    columns = measure_step(model, optimizer, step, batch)
    state = [*model.parameters(), *model.buffers(), *batch.values()]
    state += [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return {**columns, "allocator": allocator_peak(step, state)}


def _storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if isinstance(t, DTensor):
        t = t.to_local()
    if is_traceable_wrapper_subclass(t):  # e.g. torchao's float8 weight wrapper
        for attr in t.__tensor_flatten__()[0]:
            yield from _storages(getattr(t, attr))
    else:
        yield t.untyped_storage()


def allocator_peak(step: Callable[[], None], live: list[torch.Tensor]) -> float:
    """Peak bytes held during ``step``: ``live`` tensors' storages plus the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    held = {st.data_ptr(): st.nbytes() for t in live for st in _storages(t)}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )  # fmt: skip
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return float(sum(held.values()) + peak)


def _after_step(model: nn.Module, shape: StepShape) -> None:
    """The trainer's work after the optimizer step that allocates: float8 weight scales for FSDP2."""
    if shape.fp8 and shape.world_size > 1 and shape.fsdp:  # as the trainer does after each optimizer step
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)


def trace_step(
    model_cfg: ModelConfig,
    shape: StepShape,
    training: TrainingConfig,
    objective: Callable[[nn.Module, dict[str, torch.Tensor]], Any],
    *,
    transform: ModelTransform | None = None,
    fp8_filter: ModuleFilter | None = None,
    layers: int | None = None,
) -> MemoryTrace:
    """Rank 0's peak for ``shape``; ``layers`` = trace that many blocks and ``2 x layers``, extrapolate."""
    n = model_cfg.num_hidden_layers
    if layers is None or 2 * layers >= n:
        cols = _trace_once(model_cfg, shape, training, objective, transform, fp8_filter)
        return MemoryTrace(**cols, layers_traced=n, layers=n)
    a = _trace_once(model_cfg.model_copy(update={"num_hidden_layers": layers}), shape, training, objective,
                    transform, fp8_filter)  # fmt: skip
    b = _trace_once(model_cfg.model_copy(update={"num_hidden_layers": 2 * layers}), shape, training, objective,
                    transform, fp8_filter)  # fmt: skip
    # Collective buffers in flight (a block's all-gather output, its reduce-scatter input) do not grow
    # with depth; every other column is a per-block part plus a constant, so linear in the blocks.
    per_block = {c: (b[c] - a[c]) / layers if c in PER_BLOCK else 0.0 for c in COLUMNS}
    cols = {c: max(0.0, b[c] + per_block[c] * (n - 2 * layers)) for c in COLUMNS}
    return MemoryTrace(**cols, layers_traced=2 * layers, layers=n)


@dataclass(frozen=True)
class MemoryPlanResult:
    """A plan's verdict: the traced peak plus overhead against the GPU, and what would fit if it does not."""

    shape: StepShape
    trace: MemoryTrace
    overhead: float
    gpu_memory: float
    largest_micro_batch: int | None = None  # when it does not fit: the largest that does (None: none does)
    smallest_world: int | None = None  # when it does not fit: the fewest GPUs at this micro-batch

    @property
    def total(self) -> float:
        return self.trace.peak + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory * FIT_FRACTION

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": asdict(self.shape),
            "per_rank_gib": self.trace.as_gib(),
            "overhead_gib": self.overhead / GiB,
            "total_gib": self.total / GiB,
            "gpu_memory_gib": self.gpu_memory / GiB,
            "fits": self.fits,
            "layers_traced": self.trace.layers_traced,
            "largest_micro_batch": self.largest_micro_batch,
            "smallest_world": self.smallest_world,
        }


def plan_memory(
    model_cfg: ModelConfig,
    shape: StepShape,
    training: TrainingConfig,
    objective: Callable[[nn.Module, dict[str, torch.Tensor]], Any],
    *,
    gpu_memory_gib: float,
    transform: ModelTransform | None = None,
    fp8_filter: ModuleFilter | None = None,
    layers: int | None = 2,
    overhead_gib: float = OVERHEAD_GIB,
    max_world: int = 512,
) -> MemoryPlanResult:
    """Trace ``shape``; when it does not fit, the largest micro-batch that does and the smallest world size."""

    def trace(s: StepShape) -> MemoryTrace:
        return trace_step(model_cfg, s, training, objective, transform=transform, fp8_filter=fp8_filter, layers=layers)

    gpu, overhead = gpu_memory_gib * GiB, overhead_gib * GiB
    result = MemoryPlanResult(shape, trace(shape), overhead, gpu)
    if result.fits:
        return result

    def fits(s: StepShape) -> bool:
        return trace(s).peak + overhead <= gpu * FIT_FRACTION

    micro = None
    lo, hi = 0, shape.micro_batch  # fits(lo) (0 = none known), not fits(hi): bisect
    if fits(replace(shape, micro_batch=1)):
        lo = 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(replace(shape, micro_batch=mid)) else (lo, mid)
        micro = lo
    world = None
    t = result.trace
    room = gpu * FIT_FRACTION - overhead - t.activations - t.collectives
    sharded = t.params + t.grads + t.optimizer  # ~1/N with FSDP (gathered blocks aside)
    if shape.fsdp and room > 0:
        # start at the world size where the sharded state would fit, then verify by tracing
        n = max(2, 2 ** math.ceil(math.log2(max(2.0, shape.world_size * sharded / room))))
        while n <= max_world:
            if fits(replace(shape, world_size=n)):
                world = n
                break
            n *= 2
    return replace(result, largest_micro_batch=micro, smallest_world=world)


def format_plan(result: MemoryPlanResult) -> str:
    """One line for pre-flight: per-rank GiB by column, the verdict, and the fix."""
    g = result.trace.as_gib()
    s = result.shape
    extra = "" if result.trace.layers_traced == result.trace.layers else (
        f", {result.trace.layers_traced} of {result.trace.layers} blocks traced"
    )  # fmt: skip
    text = (
        f"traced {result.total / GiB:.1f} GiB per GPU of {result.gpu_memory / GiB:.0f} "
        f"({s.world_size} ranks, {s.micro_batch} x {s.seq_len} tokens, {s.precision}"
        f"{', fp8 ' + s.fp8_recipe if s.fp8 else ''}, AC {s.activation_checkpointing}): "
        f"params {g['params']:.1f}, grads {g['grads']:.1f}, optimizer {g['optimizer']:.1f}, "
        f"activations {g['activations']:.1f}, collectives {g['collectives']:.1f}, "
        f"+{result.overhead / GiB:.1f} overhead{extra}"
    )
    if result.fits:
        return text
    fixes = []
    if result.largest_micro_batch is not None:
        fixes.append(f"micro-batch {result.largest_micro_batch}")
    if result.smallest_world is not None:
        fixes.append(f"{result.smallest_world} GPUs")
    return text + ". Would fit: " + (" or ".join(fixes) or "nothing tried")
