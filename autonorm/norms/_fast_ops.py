"""Fused autograd functions behind the layers of :mod:`autonorm.norms._layers`.

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

from autonorm.norms._switchable_ops import _position_sums


def tracing(x: torch.Tensor) -> bool:
    """Whether ``x`` is being traced (torch.compile, torch.export, FX fake tensors): the
    fused functions read real data, so traced code takes plain ops, which the tracer fuses."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or type(x) not in (torch.Tensor, torch.nn.Parameter)
    )


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


def _channel_mean(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``v.mean(dim, keepdim=True)``; over dim 1 of ``(N, C, *)`` as a matrix product with a
    row of ``1/C``, which BLAS runs several times faster than torch's reduction over a
    non-innermost dim (ten times with two contended threads)."""
    if dim % v.dim() != 1 or v.dim() < 3:
        return v.mean(dim, keepdim=True)
    n, channels = v.shape[:2]
    weights = v.new_full((1, channels), 1.0 / channels)
    return torch.matmul(weights, v.reshape(n, channels, -1)).view(n, 1, *v.shape[2:])


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
        mean = _channel_mean(x, dim) if centered else None
        out = x.clone() if mean is None else x - mean
        var = _channel_mean(out * out, dim)
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
            projection = _channel_mean(buffer, dim).neg_()
            g = (
                grad
                if weight is None
                else torch.mul(grad, _channel_view(weight, x, dim), out=buffer)
            )
            grad_x = xhat.mul_(projection).add_(g)
            if mean is not None:
                grad_x.sub_(_channel_mean(g, dim))
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
    if tracing(x):
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


def _sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` ``(N, S, C)`` over S: two ``(N, C)`` tensors.

    From torch's batch-norm kernel on each sample's ``(S, C)`` slice (Welford, vectorized over
    the channels), where ``torch.var_mean`` over dim 1 runs a scalar loop twenty times slower.
    """
    stats = [torch.native_batch_norm(row, None, None, None, None, True, 0.0, 0.0) for row in x]
    invstd = torch.stack([s[2] for s in stats])
    var = torch.where(invstd > 0, invstd.pow(-2), 0.0)  # eps=0: a constant channel has inf
    return torch.stack([s[1] for s in stats]), var


def _sample_sums(
    grad: torch.Tensor, x: torch.Tensor, center: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel of ``(N, S, C)`` tensors: ``(grad * (x - center)).sum(1)`` and
    ``grad.sum(1)``, centered in the kernel (no cancellation on a large mean), no temporary."""
    ones = x.new_ones(x.shape[-1])
    sums = [
        torch.ops.aten.native_batch_norm_backward(
            g, row, ones, None, None, c, ones, True, 0.0, [False, True, True]
        )
        for g, row, c in zip(grad, x, center, strict=True)
    ]
    return torch.stack([s[1] for s in sums]), torch.stack([s[2] for s in sums])


def _token_group_moments(
    x: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of tokens ``x`` ``(N, S, C)``: the per-channel means ``(N, G, C/G)`` and the mean and
    biased variance of each sample's groups ``(N, G, 1)``, by the law of total variance from
    the per-channel moments (:func:`_sample_moments`)."""
    mean, var = _sample_moments(x)
    mean = mean.view(x.shape[0], groups, -1)
    group_mean = mean.mean(-1, keepdim=True)
    group_var = (var.view(mean.shape) + (mean - group_mean).square()).mean(-1, True)
    return mean, group_mean, group_var


def group_moments(x: torch.Tensor, groups: int, channels_last: bool) -> tuple[torch.Tensor, ...]:
    """Mean and biased variance per sample and group of ``x`` ``(N, C, P)`` (``(N, P, C)``
    when ``channels_last``), each ``(N, G)``, from torch's fused kernels (``torch.var_mean``
    over a group's channels and positions runs several times slower)."""
    n = x.shape[0]
    if channels_last:
        _, group_mean, group_var = _token_group_moments(x, groups)
        return group_mean.view(n, groups), group_var.view(n, groups)
    channels, positions = x.shape[1], x.shape[2]
    _, mean, rstd = torch.native_group_norm(x, None, None, n, channels, positions, groups, 0.0)
    var = torch.where(rstd > 0, rstd.pow(-2), 0.0)  # eps=0: a constant group has inf
    return mean.view(n, groups), var.view(n, groups)


class GroupNormTokens(torch.autograd.Function):
    """Group norm of tokens ``x`` ``(N, S, C)``: per sample over each group's channels and the
    S positions (instance norm: ``groups = C``), without moving the channels first. Saves
    ``x`` and the per-(sample, group) mean and ``rstd``; the backward is group norm's::

        dx = rstd * (g - mean_group(g) - xhat * mean_group(g * xhat)),  g = dy * weight
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        groups: int,
        eps: float,
    ) -> torch.Tensor:
        n, _, channels = x.shape
        mean, group_mean, group_var = _token_group_moments(x, groups)
        rstd = (group_var + eps).rsqrt_()
        # contiguous: reshape may keep the expansion's zero stride, which the kernels misread
        center = group_mean.expand_as(mean).reshape(n, channels).contiguous()
        a = rstd.expand_as(mean).reshape(n, channels)
        if weight is not None:
            a = a * weight
        b = -center * a
        if bias is not None:
            b = b + bias
        ctx.groups = groups
        ctx.save_for_backward(x, center, rstd, weight)
        return torch.addcmul(b.unsqueeze(1), x, a.unsqueeze(1))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, center, rstd, weight = ctx.saved_tensors
        n, positions, channels = x.shape
        grad = grad.contiguous()
        centered_sum, grad_sum = _sample_sums(grad, x, center)
        rstd_c = rstd.expand(n, ctx.groups, channels // ctx.groups).reshape(n, channels)
        grad_weight = (centered_sum * rstd_c).sum(0) if ctx.needs_input_grad[1] else None
        grad_bias = grad_sum.sum(0) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = torch.ones_like(rstd_c) if weight is None else weight.expand(n, channels)
            count = positions * (channels // ctx.groups)

            def group_mean(v: torch.Tensor) -> torch.Tensor:
                per_group = v.view(n, ctx.groups, -1).sum(-1, keepdim=True) / count
                return per_group.expand(n, ctx.groups, channels // ctx.groups).reshape(n, channels)

            mean_g = group_mean(w * grad_sum)
            mean_gx = group_mean(w * centered_sum) * rstd_c  # mean of g * xhat
            x_coef = -rstd_c * rstd_c * mean_gx  # of (x - center)
            # centered first: x * x_coef - center * x_coef cancels on a large mean
            grad_x = torch.sub(x, center.unsqueeze(1)).mul_(x_coef.unsqueeze(1))
            grad_x.addcmul_(grad, (rstd_c * w).unsqueeze(1)).sub_((rstd_c * mean_g).unsqueeze(1))
        return grad_x, grad_weight, grad_bias, None, None


def group_norm_tokens(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """:class:`GroupNormTokens` of ``x`` ``(N, *, C)``, or plain ops under ``torch.compile``."""
    n, channels = x.shape[0], x.shape[-1]
    x3 = x.reshape(n, -1, channels)
    if tracing(x):
        h = x3.view(n, -1, groups, channels // groups)
        var, mean = torch.var_mean(h, (1, 3), correction=0, keepdim=True)
        out = ((h - mean) * torch.rsqrt(var + eps)).view(x3.shape)
        if weight is not None:
            out = out * weight
        return (out if bias is None else out + bias).view(x.shape)
    return GroupNormTokens.apply(x3.contiguous(), weight, bias, groups, eps).view(x.shape)


def _position_dots(a: torch.Tensor, b: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Per sample and channel of 3-D tensors ``(N, C, P)`` (``(N, P, C)`` when
    ``channels_last``): ``(a * b).sum`` over the positions P, without a product temporary."""
    if channels_last:
        zero = a.new_zeros(a.shape[0], a.shape[-1])
        return _sample_sums(a, b, zero)[0]
    return _position_sums(a, b)[0]  # the batch-norm backward kernel's reductions, one pass


class FilterResponseNormFunction(torch.autograd.Function):
    """FRN + TLU of a 3-D ``x`` (``(N, C, P)``, or ``(N, P, C)`` when ``channels_last``)::

        y = max(x * a + b, tau),  a = weight * rstd,  rstd = (mean_P(x^2) + eps) ** -0.5

    Saves ``x`` and the per-(sample, channel) ``rstd``; the backward recomputes the
    pre-threshold value for the TLU's mask (``g'``: the gradient where it passes)::

        dx = a * g' - x * weight * rstd^3 * mean_P(g' * x)
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        tau: torch.Tensor,
        eps: float,
        channels_last: bool,
    ) -> torch.Tensor:
        pos = 1 if channels_last else 2
        positions = x.shape[pos]
        if channels_last:  # over a non-innermost dim: vector_norm's reduction runs slower
            mean_square = x.square().mean(pos)
        else:
            mean_square = torch.linalg.vector_norm(x, dim=pos).square_().div_(positions)
        rstd = (mean_square + eps).rsqrt_()
        ctx.channels_last = channels_last
        ctx.save_for_backward(x, rstd, weight, bias, tau)
        out = FilterResponseNormFunction._pre_threshold(ctx, x, rstd, weight, bias)
        return out.clamp_(min=FilterResponseNormFunction._view(ctx, tau))

    @staticmethod
    def _view(ctx: Any, per_channel: torch.Tensor) -> torch.Tensor:
        """A ``(C,)`` or ``(N, C)`` tensor shaped to broadcast over ``x``."""
        if ctx.channels_last:
            return per_channel.unsqueeze(-2)
        return per_channel.unsqueeze(-1)

    @staticmethod
    def _pre_threshold(
        ctx: Any,
        x: torch.Tensor,
        rstd: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        a = rstd if weight is None else rstd * weight
        view = FilterResponseNormFunction._view
        if bias is None:
            return torch.mul(x, view(ctx, a))
        return torch.addcmul(view(ctx, bias), x, view(ctx, a))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, rstd, weight, bias, tau = ctx.saved_tensors
        view, cl = FilterResponseNormFunction._view, ctx.channels_last
        grad = grad.contiguous()
        y = FilterResponseNormFunction._pre_threshold(ctx, x, rstd, weight, bias)
        # g': the gradient the TLU lets through; a float mask in place (bool masks and
        # torch.where run several times slower on CPU)
        passed = torch.gt(y, view(ctx, tau), out=y).mul_(grad)
        other = (0, 1) if cl else (0, 2)
        grad_passed_sum = passed.sum(other)
        grad_tau = grad.sum(other) - grad_passed_sum if ctx.needs_input_grad[3] else None
        dots = _position_dots(passed, x, cl)  # sum_P(g' * x) per (sample, channel)
        grad_weight = (dots * rstd).sum(0) if ctx.needs_input_grad[1] else None
        grad_bias = grad_passed_sum if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            a = rstd if weight is None else rstd * weight
            coef = a * rstd.square() * dots / x.shape[1 if cl else 2]
            grad_x = passed.mul_(view(ctx, a)).addcmul_(x, view(ctx, coef), value=-1)
        return grad_x, grad_weight, grad_bias, grad_tau, None, None


def filter_response_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    tau: torch.Tensor,
    eps: float,
    channels_last: bool,
) -> torch.Tensor:
    """FRN + TLU of ``x`` (``(N, C, *)``, or ``(N, *, C)`` when ``channels_last``): the fused
    function on float32/float64 outside autocast, else plain ops (which a tracer fuses)."""
    if tracing(x) or not fused_dtype(x):
        pos = list(range(1, x.dim() - 1)) if channels_last else list(range(2, x.dim()))
        shape = [1] * x.dim()
        shape[-1 if channels_last else 1] = -1
        out = x * torch.rsqrt(x.square().mean(pos, keepdim=True) + eps)
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        return torch.maximum(out, tau.view(shape))
    n, channels = x.shape[0], x.shape[-1 if channels_last else 1]
    shape3 = (n, -1, channels) if channels_last else (n, channels, -1)
    x3 = x.reshape(shape3).contiguous()
    return FilterResponseNormFunction.apply(x3, weight, bias, tau, eps, channels_last).view(x.shape)


class EvoNormS0Function(torch.autograd.Function):
    """EvoNorm-S0 of ``x`` viewed per group (``(N, G, C/G, P)``, or ``(N, P, G, C/G)`` when
    ``channels_last``)::

        y = h * rstd * weight + bias,  h = x * sigmoid(v * x),  rstd = (var_group(x) + eps) ** -0.5

    Saves ``x`` and the per-(sample, group) mean and ``rstd``; the backward recomputes the gate::

        dx = g * weight * rstd * (s + v * x * s * (1 - s)) + c * (x - mean),
        c = -rstd^3 / M * sum_group(g * weight * h),  s = sigmoid(v * x)
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        v: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        channels_last: bool,
    ) -> torch.Tensor:
        ctx.stats_dims = (1, 3) if channels_last else (2, 3)
        ctx.positions_dim = 1 if channels_last else 3
        ctx.param_shape = (1, 1, *x.shape[2:]) if channels_last else (1, *x.shape[1:3], 1)
        n, groups = x.shape[0], x.shape[2 if channels_last else 1]
        flat = (
            (n, -1, x.shape[2] * x.shape[3]) if channels_last else (n, x.shape[1] * x.shape[2], -1)
        )
        mean, var = group_moments(x.view(flat), groups, channels_last)
        stats_shape = (n, 1, groups, 1) if channels_last else (n, groups, 1, 1)
        mean, rstd = mean.view(stats_shape), (var.view(stats_shape) + eps).rsqrt_()
        out = torch.mul(x, v.view(ctx.param_shape)).sigmoid_().mul_(x).mul_(rstd)
        if weight is not None and bias is not None:
            out.mul_(weight.view(ctx.param_shape)).add_(bias.view(ctx.param_shape))
        ctx.save_for_backward(x, mean, rstd, v, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, mean, rstd, v, weight = ctx.saved_tensors
        shape, pos = ctx.param_shape, ctx.positions_dim
        per_channel = [d for d in range(4) if shape[d] == 1]  # the dims a channel sums over
        grad = grad.contiguous()
        gate = torch.mul(x, v.view(shape)).sigmoid_()
        buffer = torch.mul(x, gate).mul_(grad)  # g * h
        gh = buffer.sum(pos, keepdim=True)  # per (sample, channel)
        w = torch.ones_like(v) if weight is None else weight
        grad_weight = (gh * rstd).sum(per_channel).view(-1) if weight is not None else None
        grad_bias = grad.sum(per_channel).view(-1) if weight is not None else None
        count = x[0].numel() / rstd[0].numel()  # values per (sample, group)
        coef = (gh * w.view(shape)).sum(ctx.stats_dims, keepdim=True) * rstd.pow(3) / -count
        xss = torch.addcmul(gate, gate, gate, value=-1, out=buffer).mul_(x)  # x s (1 - s)
        slope = gate.addcmul_(xss, v.view(shape))  # dh/dx = s + v x s (1 - s)
        scale = rstd * w.view(shape)  # per (sample, channel): dL/dh = g * scale
        grad_v = (xss.mul_(grad).mul_(x).sum(pos, keepdim=True) * scale).sum(per_channel)
        grad_x = slope.mul_(grad).mul_(scale).addcmul_(x, coef).sub_(coef * mean)
        return grad_x, grad_v.view(-1), grad_weight, grad_bias, None, None


def evonorm_s0(
    x: torch.Tensor,
    groups: int,
    v: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    channels_last: bool,
) -> torch.Tensor | None:
    """:class:`EvoNormS0Function` of ``x`` (``(N, C, *)``, or ``(N, *, C)`` when
    ``channels_last``), or None where plain ops apply (tracing, half precision, autocast)."""
    if tracing(x) or not fused_dtype(x):
        return None
    n, channels = x.shape[0], x.shape[-1 if channels_last else 1]
    size = channels // groups
    shape4 = (n, -1, groups, size) if channels_last else (n, groups, size, -1)
    x4 = x.reshape(shape4).contiguous()
    return EvoNormS0Function.apply(x4, v, weight, bias, eps, channels_last).view(x.shape)


class BatchRenormFunction(torch.autograd.Function):
    """Batch Renormalization's training step on ``x`` ``(N, C, *)`` or ``(M, C)``: torch's
    batch-norm kernel normalizes with the batch statistics (and moves the running ones in
    place by ``factor``); ``r`` and ``d``, from the batch statistics and the running ones
    before that move, then scale and shift its output in place. With ``r`` and ``d`` constants
    the step is a batch norm whose affine is ``(weight * r, weight * d + bias)``: the backward
    is torch's batch-norm backward with that weight, from the saved input and batch statistics.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running: tuple[torch.Tensor, torch.Tensor],
        factor: float,
        eps: float,
        limits: tuple[float, float],
    ) -> torch.Tensor:
        running_mean, running_var = running
        sigma = (running_var + eps).sqrt()  # the running statistics before the kernel moves them
        old_mean = running_mean.clone()
        out, mean, invstd = torch.native_batch_norm(
            x, None, None, running_mean, running_var, True, factor, eps
        )
        r_max, d_max = limits
        r = (invstd.reciprocal() / sigma).clamp_(1.0 / r_max, r_max).to(x.dtype)
        d = ((mean - old_mean) / sigma).clamp_(-d_max, d_max).to(x.dtype)
        scale = r if weight is None else weight * r
        shift = d if weight is None else weight * d
        if bias is not None:
            shift = shift + bias
        ctx.eps = eps
        ctx.save_for_backward(x, mean, invstd, r, d, weight)
        return out.mul_(_channel_view(scale, x, 1)).add_(_channel_view(shift, x, 1))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, mean, invstd, r, d, weight = ctx.saved_tensors
        scale = r if weight is None else weight * r
        grad_x, grad_scale, grad_shift = torch.ops.aten.native_batch_norm_backward(
            grad, x, scale, None, None, mean, invstd, True, ctx.eps, [True, True, True]
        )
        grad_weight = grad_scale * r + grad_shift * d if ctx.needs_input_grad[1] else None
        grad_bias = grad_shift if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None
