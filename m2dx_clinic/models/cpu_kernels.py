"""Faster CPU kernels for the same layers: oneDNN matrix products in fp32, matmul attention in bf16.

Why: on the CPU, PyTorch sends fp32 `Linear` layers to MKL, whose AMD code path is about half as fast
as oneDNN's on the same AVX-512 machine (this CPU: 110-180 vs 320-370 GFLOP/s, BENCHMARKS.md), and its
fused attention kernel does not use bf16 matrix units. Both switches compute the same function up to
rounding and leave the parameters, the state dict and the checkpoint formats untouched.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def onednn_linear_available() -> bool:
    """True when PyTorch ships oneDNN's dense linear op and it agrees with `F.linear` on a small check."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b, g = (torch.randn(s, generator=gen) for s in ((5, 7), (3, 7), (3,), (5, 3)))
        ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
        ok = ok and torch.allclose(op(g.t(), x.t(), None, "none", [], ""), g.t() @ x, atol=1e-5)  # strided operands
    except (RuntimeError, NotImplementedError):
        return False
    return bool(ok)


def _onednn_mm(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b_t.T [K, N] (+ bias [N]) on oneDNN; transposed (strided) operands need no copy."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


class _OneDnnLinearFunction(torch.autograd.Function):
    """y = x W^T + b with the forward and both backward products on oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)  # [M, K] -> [M, N]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # [M, N]; a broadcast gradient has zero strides
        grad_x = _onednn_mm(grad, weight.t()) if ctx.needs_input_grad[0] else None  # [M, N] @ [N, K]
        grad_w = _onednn_mm(grad.t(), x.t()) if ctx.needs_input_grad[1] else None  # [N, M] @ [M, K]
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class OneDnnLinear(nn.Linear):
    """`nn.Linear` whose fp32 CPU products run on oneDNN; anything else (GPU, autocast, bf16) as usual.

    Installed by swapping the class of existing layers (`use_onednn_linear`), so parameters, hooks
    and state-dict keys stay those of `nn.Linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._eager_cpu_fp32(x):
            return F.linear(x, self.weight, self.bias)
        y = _OneDnnLinearFunction.apply(x.reshape(-1, self.in_features), self.weight, self.bias)  # [M, N]
        return y.view(*x.shape[:-1], self.out_features)

    def _eager_cpu_fp32(self, x: torch.Tensor) -> bool:
        """The oneDNN path only runs eagerly on fp32 CPU tensors; tracers and compilers see `F.linear`."""
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
                or torch.onnx.is_in_onnx_export()):
            return False
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return False
        return not torch.is_autocast_enabled("cpu") and x.numel() > 0


def use_onednn_linear(module: nn.Module, enabled: bool = True) -> int:
    """Switch every plain `nn.Linear` in `module` to `OneDnnLinear` (or back). Returns how many."""
    source, target = (nn.Linear, OneDnnLinear) if enabled else (OneDnnLinear, nn.Linear)
    layers = [m for m in module.modules() if type(m) is source]
    for layer in layers:
        layer.__class__ = target
    return len(layers)


def use_matmul_attention(module: nn.Module, enabled: bool = True) -> int:
    """Switch every timm attention layer in `module` to explicit matmul + softmax (or back to SDPA).

    On a CPU in bf16, PyTorch's fused CPU attention kernel does not use the bf16 matrix units, while
    two batched matmuls do: 2.5-5x faster at these sequence lengths (BENCHMARKS.md). In fp32 the
    fused kernel is the faster one. Returns the number of layers switched.
    """
    from timm.models.vision_transformer import Attention

    layers = [m for m in module.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.fused_attn = not enabled
    return len(layers)


def use_fast_cpu_kernels(modules: list[nn.Module | None], device: torch.device,
                         amp_dtype: torch.dtype | None) -> list[str]:
    """Pick the faster kernels for a CPU run (fp32: oneDNN linear; bf16: matmul attention).

    Does nothing on other devices. Returns a short note per switch, for the run's log.
    """
    present = [m for m in modules if m is not None]
    if device.type != "cpu" or not present:
        return []
    if amp_dtype == torch.bfloat16:
        count = sum(use_matmul_attention(m) for m in present)
        return [f"CPU bf16: {count} attention layers use matmul attention (bf16 matrix units)"]
    if amp_dtype is None and onednn_linear_available():
        count = sum(use_onednn_linear(m) for m in present)
        return [f"CPU fp32: {count} linear layers use oneDNN matrix products"]
    return []
