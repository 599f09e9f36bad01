"""Fused autograd functions behind the layers of :mod:`autonorm.norms.layers`.

Each saves its input and per-position statistics only, recomputes what the backward needs
from them, and reduces per channel with torch's batch-norm backward kernel where it can: on a
CPU the time of these memory-bound layers goes to passes over the input and to fresh
input-sized allocations (their first touch page-faults), so each function keeps both few.
Under ``torch.compile`` the layers use plain ops instead, which the compiler fuses itself.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable


def fused_dtype(x: torch.Tensor) -> bool:
    """Whether the fused functions apply: float32/float64 outside autocast (half precision
    and autocast keep torch's layers, which compute their statistics in float32)."""
    return x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(
        x.device.type
    )


def _reduce_dims(x: torch.Tensor, channel_dim: int) -> list[int]:
    return [d for d in range(x.dim()) if d != channel_dim % x.dim()]


def _channel_sums(
    grad: torch.Tensor, x: torch.Tensor, channel_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel: ``(grad * x).sum()`` and ``grad.sum()`` over every other dim.

    For contiguous tensors these come from torch's batch-norm backward kernel with mean 0 and
    inverse std 1: one pass over both and no input-sized temporary (see
    :func:`autonorm.norms._switchable_ops._position_sums`).
    """
    channels = x.shape[channel_dim]
    if not (grad.is_contiguous() and x.is_contiguous()):
        dims = _reduce_dims(x, channel_dim)
        return (grad * x).sum(dims), grad.sum(dims)
    if channel_dim % x.dim() == x.dim() - 1:
        shape: tuple[int, ...] = (-1, channels)
    else:
        shape = (math.prod(x.shape[:channel_dim]), channels, -1)
    ones = x.new_ones(channels)
    _, grad_x_sum, grad_sum = torch.ops.aten.native_batch_norm_backward(
        grad.view(shape),
        x.view(shape),
        ones,
        None,
        None,
        x.new_zeros(channels),
        ones,
        True,
        0.0,
        [False, True, True],
    )
    return grad_x_sum, grad_sum


def _channel_view(param: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    return param.view(shape)


class _NormOverChannels(torch.autograd.Function):
    """Layer norm (``centered``) or RMS norm over ``dim`` (the channels) of ``x``, times
    per-channel ``weight`` plus ``bias``. Saves ``x`` and the per-position ``mean`` and
    ``rstd``; the backward recomputes the normalized input::

        dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)),  g = dy * weight

    (without ``mean_c(g)`` for RMS norm).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        dim: int,
        eps: float,
        centered: bool,
    ) -> torch.Tensor:
        # two passes (mean, then the norm of the centered input): stable for a large mean, and
        # vectorized over the positions, where torch.var_mean over dim 1 loops per element
        mean = x.mean(dim, keepdim=True) if centered else None
        out = x.clone() if mean is None else x - mean
        var = torch.linalg.vecdot(out, out, dim=dim).unsqueeze(dim).div_(x.shape[dim])
        rstd = (var + eps).rsqrt_()
        out.mul_(rstd)
        if weight is not None:
            out.mul_(_channel_view(weight, x, dim))
        if bias is not None:
            out.add_(_channel_view(bias, x, dim))
        ctx.dim = dim
        ctx.save_for_backward(x, mean, rstd, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, mean, rstd, weight = ctx.saved_tensors
        dim = ctx.dim
        # two input-sized buffers: fresh allocations page-fault, and dominate on CPU
        xhat = x.clone() if mean is None else x - mean
        xhat.mul_(rstd)
        sums: tuple[torch.Tensor | None, ...] = _channel_sums(grad, xhat, dim)
        grad_weight, grad_bias = sums
        grad_x = None
        if ctx.needs_input_grad[0]:
            buffer = grad * xhat
            if weight is not None:
                buffer.mul_(_channel_view(weight, x, dim))  # g * xhat, g = dy * weight
            projection = buffer.sum(dim, keepdim=True).div_(-x.shape[dim])
            g = (
                grad
                if weight is None
                else torch.mul(grad, _channel_view(weight, x, dim), out=buffer)
            )
            grad_x = xhat.mul_(projection).add_(g)
            if mean is not None:
                grad_x.sub_(g.mean(dim, keepdim=True))
            grad_x.mul_(rstd)
        if not ctx.needs_input_grad[1]:
            grad_weight = None
        if not ctx.needs_input_grad[2]:
            grad_bias = None
        return grad_x, grad_weight, grad_bias, None, None, None


def norm_over_channels(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dim: int,
    eps: float,
    centered: bool,
) -> torch.Tensor:
    """Layer (``centered``) or RMS norm of ``x`` over ``dim``: the fused function, or plain ops
    under ``torch.compile`` (which fuses them itself)."""
    if torch.compiler.is_compiling():
        if centered:
            var, mean = torch.var_mean(x, dim, correction=0, keepdim=True)
            out = (x - mean) * torch.rsqrt(var + eps)
        else:
            out = x * torch.rsqrt(x.square().mean(dim, keepdim=True) + eps)
        if weight is not None:
            out = out * _channel_view(weight, x, dim)
        return out if bias is None else out + _channel_view(bias, x, dim)
    return _NormOverChannels.apply(x, weight, bias, dim, eps, centered)


class DyTFunction(torch.autograd.Function):
    """``tanh(alpha * x) * weight + bias`` saving ``x`` only: the backward recomputes the tanh."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        alpha: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        dim: int,
    ) -> torch.Tensor:
        out = torch.mul(x, alpha).tanh_()
        if weight is not None and bias is not None:
            view = _channel_view(bias, x, dim)
            out = torch.addcmul(view, out, _channel_view(weight, x, dim), out=out)
        ctx.dim = dim
        ctx.save_for_backward(x, alpha, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, alpha, weight = ctx.saved_tensors
        t = torch.mul(x, alpha).tanh_()  # the one input-sized buffer, grad_x in the end
        sums: tuple[torch.Tensor | None, ...] = _channel_sums(grad, t, ctx.dim)
        grad_weight, grad_bias = sums
        # d tanh(u) / du = 1 - tanh(u)^2: grad - grad * t^2, written over t
        dpre = torch.addcmul(grad, grad, t.square_(), value=-1, out=t)
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            per_channel, _ = _channel_sums(dpre, x, ctx.dim)  # times weight: dL/du's factor
            grad_alpha = (per_channel if weight is None else per_channel * weight).sum().view(1)
        scale = alpha if weight is None else _channel_view(weight * alpha, x, ctx.dim)
        grad_x = dpre.mul_(scale) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[2]:
            grad_weight = None
        if not ctx.needs_input_grad[3]:
            grad_bias = None
        return grad_x, grad_alpha, grad_weight, grad_bias, None
