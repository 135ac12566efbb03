"""Parallelism applied from outside the model: float8, activation checkpointing, compile, FSDP2.

Order (as in torchtitan): float8 conversion swaps ``nn.Linear`` modules, activation checkpointing
wraps each block, ``torch.compile`` compiles each block in place, and FSDP2 ``fully_shard`` shards
each block and then the root. Everything here imports and runs on a CPU-only build; CUDA-only
paths are selected at run time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from llm_pipeline.train.config import ParallelConfig

log = logging.getLogger(__name__)

# Minimum CUDA compute capability with FP8 tensor cores (Ada 8.9, Hopper 9.0).
FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(kind: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; asking for CUDA without one is an error."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("parallel.device is 'cuda' but no CUDA GPU is visible; use 'cpu' or 'auto'")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device_kind: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return DistInfo(device=device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        device=device,
    )


# --------------------------------------------------------------------------------------------
# FP8
# --------------------------------------------------------------------------------------------


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """Whether float8 training kernels exist here, and why not when they do not."""
    if device.type != "cuda":
        return False, f"device is {device.type}; FP8 training needs an NVIDIA GPU with compute capability >= 8.9"
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return False, f"{name} has compute capability {cap[0]}.{cap[1]}; FP8 needs >= 8.9 (H100, H200, L4, L40S)"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return False, "torchao is not installed (pip install 'llm-pipeline[fp8]')"
    return True, ""


def resolve_fp8(requested: bool | None, device: torch.device, *, emulate: bool = False) -> bool:
    """``None`` = use FP8 when supported; ``True`` = required (clear error otherwise); ``False`` = off.

    ``emulate`` (``parallel.fp8_emulate``) turns FP8 on where there is no FP8 hardware: torchao runs the
    same conversion, scaling and FSDP2 float8 all-gather, with the matmuls in fp32 on the dequantised
    float8 values. It exists to exercise the FP8 path on CPU (tests) and is refused on a GPU that has
    real FP8 tensor cores, where it would only be slower than the real kernels.
    """
    ok, why = fp8_supported(device)
    if emulate:
        if requested is False:
            return False
        if ok:
            raise ValueError(
                f"parallel.fp8_emulate is true but {torch.cuda.get_device_name(device)} has FP8 tensor cores: "
                "emulation would run the matmuls in fp32; set parallel.fp8_emulate: false to use the real kernels"
            )
        try:
            import torchao.float8  # noqa: F401
        except ImportError as e:
            raise ValueError("parallel.fp8_emulate needs torchao (pip install 'llm-pipeline[fp8]')") from e
        log.info("FP8 training emulated (torchao float8, emulate=True): float8 casts and scales, fp32 matmuls")
        return True
    if requested is None:
        if ok:
            log.info("FP8 training enabled automatically (torchao float8); disable with --no-fp8")
        return ok
    if requested and not ok:
        raise ValueError(
            f"--fp8 was requested but FP8 training is not available: {why}. Run with --no-fp8 "
            "(or set parallel.fp8_emulate: true to exercise the FP8 path without FP8 hardware, e.g. in CPU tests)."
        )
    return requested


def _fp8_filter(module: nn.Module, fqn: str) -> bool:
    # The LM head stays in high precision (its outputs feed the softmax); float8 GEMMs need dims % 16.
    if fqn.endswith("lm_head"):
        return False
    if isinstance(module, nn.Linear):
        return module.in_features % 16 == 0 and module.out_features % 16 == 0
    return True


ModuleFilter = Callable[[nn.Module, str], bool]


# torchao's recipes (Float8LinearRecipeName): tensorwise is torchtitan's default and the only one whose
# weights FSDP2 can all-gather in float8; the rowwise ones scale per row (more accurate, CUTLASS kernel).
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


def float8_config(recipe: str = "tensorwise", *, emulate: bool = False, fsdp_float8_all_gather: bool = False):
    """torchao's ``Float8LinearConfig`` for ``recipe``; the float8 all-gather only where torchao has it."""
    import dataclasses

    from torchao.float8 import Float8LinearConfig

    if recipe not in FP8_RECIPES:
        raise ValueError(f"parallel.fp8_recipe must be one of {', '.join(FP8_RECIPES)}, got {recipe!r}")
    config = Float8LinearConfig.from_recipe_name(recipe)
    # torchao supports the float8 all-gather for tensorwise weight scaling only; rowwise gathers bf16/fp32.
    all_gather = fsdp_float8_all_gather and recipe == "tensorwise"
    return dataclasses.replace(config, emulate=emulate, enable_fsdp_float8_all_gather=all_gather)


def apply_float8(
    model: nn.Module,
    *,
    fsdp_float8_all_gather: bool = False,
    module_filter: ModuleFilter | None = None,
    recipe: str = "tensorwise",
    emulate: bool = False,
) -> int:
    """Swap the blocks' ``nn.Linear`` for torchao ``Float8Linear`` (dynamic scaling, ``recipe``); returns count.

    ``module_filter`` narrows the choice further (a stage's transform keeps its adapters out).
    """
    from torchao.float8 import convert_to_float8_training

    def keep(module: nn.Module, fqn: str) -> bool:
        return _fp8_filter(module, fqn) and (module_filter is None or module_filter(module, fqn))

    config = float8_config(recipe, emulate=emulate, fsdp_float8_all_gather=fsdp_float8_all_gather)
    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    return len(float8_module_names(model))


def float8_module_names(model: nn.Module) -> list[str]:
    """Names of the modules torchao converted (what a test or a log asserts on)."""
    from torchao.float8.float8_linear import Float8Linear

    return [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]


# --------------------------------------------------------------------------------------------
# Activation checkpointing and compile
# --------------------------------------------------------------------------------------------

# Selective AC keeps these ops' outputs and recomputes the cheap elementwise work around them.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap every block: ``full`` recomputes the whole block, ``selective`` only non-matmul ops."""
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.model.layers
    for i, block in enumerate(layers):
        kwargs: dict = {"preserve_rng_state": False}
        if mode == "selective":
            kwargs["context_fn"] = _selective_context
        elif mode != "full":
            raise ValueError(f"activation_checkpointing must be none, full or selective, got {mode!r}")
        layers[i] = checkpoint_wrapper(block, **kwargs)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (same module, same state-dict names); one graph reused by all blocks."""
    for block in model.model.layers:
        block.compile(fullgraph=False)


# --------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------


def param_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def apply_fsdp(model: nn.Module, *, precision: str, reshard_after_forward: bool, device: torch.device) -> None:
    """``fully_shard`` each block, then the root (embedding, final norm, head), over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype(precision), reduce_dtype=torch.float32)
    shard = partial(fully_shard, mesh=mesh, mp_policy=mp)
    layers = model.model.layers
    for i, block in enumerate(layers):
        # The last block's params are needed again at once by backward: keep them gathered.
        shard(block, reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    shard(model, reshard_after_forward=reshard_after_forward)


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    *,
    info: DistInfo,
    precision: str,
    fp8: bool,
    fp8_filter: ModuleFilter | None = None,
) -> nn.Module:
    """Apply float8, AC, compile and (with several ranks) FSDP2 in the order that composes."""
    if fp8:
        n = apply_float8(
            model,
            fsdp_float8_all_gather=info.distributed and cfg.fsdp,
            module_filter=fp8_filter,
            recipe=cfg.fp8_recipe,
            emulate=cfg.fp8_emulate,
        )
        log.info(
            "float8 (%s%s): converted %d linear layers", cfg.fp8_recipe, ", emulated" if cfg.fp8_emulate else "", n
        )
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model)
    if info.distributed:
        if not cfg.fsdp:
            raise ValueError("several ranks need parallel.fsdp: true (plain DDP is not supported)")
        apply_fsdp(model, precision=precision, reshard_after_forward=cfg.reshard_after_forward, device=info.device)
    return model


def uses_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard_all(model: nn.Module) -> None:
    """After an exception mid-step, free any gathered FSDP params so memory really comes back."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# --------------------------------------------------------------------------------------------
# Collectives: the project's one set (training loop, stages and checkpoints all use these)
# --------------------------------------------------------------------------------------------
# Each is a no-op for one process, so callers never branch on "distributed or not".


def is_distributed() -> bool:
    """True when this process is one of several ranks in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def collective_device() -> torch.device:
    """Where a collective's tensor must live: the current GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (every rank gets the total); returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum of ``t`` over ranks in place (every rank gets it); returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sum_over_ranks(value: float) -> float:
    """A Python number summed over ranks, in float64 (byte counts stay exact)."""
    if not is_distributed():
        return value
    return float(all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64, device=collective_device())).item())


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when it is true on at least one: ranks take the same branch, no collective hangs.

    ``device`` is where the flag's tensor goes (the training device); by default :func:`collective_device`.
    """
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device() if device is None else device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
