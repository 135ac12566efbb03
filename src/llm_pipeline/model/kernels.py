"""Kernels the model calls where PyTorch's default one is slow on some CPUs; same numerics, never new math.

bf16 matmuls on a CPU without native bf16 support (no AVX-512: e.g. AMD EPYC Zen 3) fall back in
PyTorch to a reference kernel that runs ~50x slower than its fp32 matmul (measured: 2.5 GFLOP/s
against 146 on 2 cores). A product of two bf16 numbers is exact in fp32, so an fp32 matmul of the
bf16-rounded operands, rounded to bf16 at the end, computes what autocast's bf16 matmul computes
(bf16 operands, fp32 accumulation, bf16 result); only the summation order differs, as between any
two BLAS kernels. :func:`linear`, :func:`attention` and the fused LM-head loss (through
:func:`matmul_dtype`) take that path there (attention: bf16-rounded q/k/v, fp32 softmax and sums, a
bf16 result; PyTorch's CPU kernel is as slow in bf16), and PyTorch's own kernel everywhere else (GPUs,
CPUs with AVX-512 or AMX, fp32, adapters, float8 layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _native_bf16_matmul() -> bool:
    """Whether PyTorch's CPU bf16 matmul has a fast kernel here (oneDNN's: AVX-512 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the probe: assume the kernel is fast
        return True


#: Decided once at import (a constant to ``torch.compile``, not a call it would trace).
NATIVE_CPU_BF16_MATMUL = _native_bf16_matmul()


class _Bf16LinearInFp32(torch.autograd.Function):
    """``x @ w.T`` for bf16 ``x`` and ``w`` through fp32 matmuls (forward and both gradients), bf16 results.

    Saves the bf16 operands, as autocast's bf16 linear does: no more memory than the native path.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return F.linear(x.float(), w.float()).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        g = grad.float()
        gx = (g @ w.float()).to(torch.bfloat16) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1]).float()).to(torch.bfloat16)
        return gx, gw


def emulates_bf16(x: torch.Tensor) -> bool:
    """True where :func:`linear` would run a bf16-autocast matmul as fp32 (CPU, autocast bf16, no fast kernel)."""
    return (
        not NATIVE_CPU_BF16_MATMUL
        and x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a plain bias-free ``nn.Linear`` under CPU bf16 autocast without a fast bf16 kernel
    runs as an fp32 matmul of the bf16-rounded operands (autocast's numerics, ~30x faster there)."""
    if type(module) is nn.Linear and module.bias is None and emulates_bf16(x):
        with torch.autocast("cpu", enabled=False):
            w = module.weight.to(torch.bfloat16)
            return _Bf16LinearInFp32.apply(x.to(torch.bfloat16), w)
    return module(x)


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a ``dtype`` matmul runs in on ``device``: fp32 for bf16 on a CPU without a fast bf16 kernel
    (operands rounded to bf16 first, results rounded back with :func:`round_to_`), else ``dtype`` itself."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not NATIVE_CPU_BF16_MATMUL:
        return torch.float32
    return dtype


def round_to_(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded in place to ``dtype``'s precision, keeping its own dtype (an emulated bf16 result)."""
    if dtype != x.dtype:
        x.copy_(x.to(dtype))
    return x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; under CPU bf16 autocast without a fast bf16 kernel, on the
    bf16-rounded q/k/v in fp32 with a bf16 result (PyTorch's bf16 CPU attention is ~15x slower there)."""
    if emulates_bf16(q):
        with torch.autocast("cpu", enabled=False):
            q, k, v = (x.to(torch.bfloat16).float() for x in (q, k, v))
            return F.scaled_dot_product_attention(q, k, v, **kwargs).to(torch.bfloat16)  # type: ignore[arg-type]
    return F.scaled_dot_product_attention(q, k, v, **kwargs)  # type: ignore[arg-type]
