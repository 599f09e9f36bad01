"""SwitchableNorm's statistics kernels and custom autograd functions.

Channels-first layers take every statistic from one pass over the input: the per-(n, c) instance
mean and (biased) variance; the layer and batch statistics follow from them by the law of total
variance. All three are per-(n, c) quantities, so the output is ``x * a[n, c] + b[n, c]`` and the
backward needs only per-(n, c) reductions: :class:`PerChannelAffine` saves the input alone (as
BatchNorm does) and differentiates the small per-(n, c) graph with autograd.

Channels-last layers (tokens ``(..., C)``) mix per-token statistics (layer, rms) with per-channel
ones (batch): the mixed mean and variance are a row term plus a column term. :class:`TokenNorm`
saves only the input and the row and column moments, and recomputes the normalized input in the
backward, so the layer keeps one input-sized tensor for the backward, like LayerNorm.

The moments, and the per-(n, c) sums of the channels-first backward, come from torch's fused
normalization kernels (group norm with one group per channel, layer norm, batch norm), which are
vectorized where ``torch.var_mean`` is not and need no input-sized temporaries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

#: ``f(mean, var, *params) -> ((a, b), extra)`` of :class:`PerChannelAffine`; ``extra`` of the
#: forward's call (the layer's batch statistics) comes back with the output, untouched.
AffineFromStats = Callable[..., tuple[tuple[torch.Tensor, torch.Tensor], Any]]
#: ``f(row_mean, row_var, col_mean, col_var, *params) -> (terms, extra)`` of :class:`TokenNorm`.
TermsFromStats = Callable[..., tuple[tuple[torch.Tensor, ...], Any]]


def records_stats() -> bool:
    """Whether a statistics function runs in the forward, where it hands back the step's batch
    statistics for the running ones: the custom functions' forwards run without grad and their
    backwards recompute with it; a compiled forward calls the function once, with grad."""
    return not torch.is_grad_enabled() or torch.compiler.is_compiling()


def local_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Eval-mode batch statistics (no running statistics) stay per process, as BatchNorm's."""
    return tensor


def sum_over_samples(stat: torch.Tensor) -> torch.Tensor:
    """The sum of per-sample statistics ``(N, C)`` over this process's samples: ``(1, C)``."""
    return stat.sum(0, keepdim=True)


def instance_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` ``(N, C, S)`` over S: two ``(N, C)`` tensors, no grad.

    Taken from torch's fused group-norm kernel with one group per channel, which computes them
    in one vectorized pass; ``torch.var_mean`` over the last dim runs a scalar Welford loop
    that is over ten times slower on CPU. The kernel's normalized output is discarded. The
    kernel needs a contiguous input: a channels_last or sliced ``x`` is copied for it.
    """
    n, c, size = x.shape
    _, mean, rstd = torch.native_group_norm(x.contiguous(), None, None, n, c, size, c, 0.0)
    return mean.view(n, c), _variance(rstd.view(n, c))


def _variance(rstd: torch.Tensor) -> torch.Tensor:
    """The variance from a kernel's ``rstd = 1 / sqrt(var + eps)`` computed with ``eps=0``.

    A zero variance comes back as ``rstd = inf`` (group and layer norm) or ``rstd = 0`` (the
    batch-norm kernel's convention): both give 0.
    """
    return torch.where(rstd > 0, rstd.pow(-2), 0.0)


def row_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of each row of ``x`` ``(M, C)``: two ``(M, 1)`` tensors, no grad
    (torch's fused layer-norm kernel, as in :func:`instance_moments`)."""
    _, mean, rstd = torch.native_layer_norm(x.contiguous(), x.shape[-1:], None, None, 0.0)
    return mean.view(-1, 1), _variance(rstd.view(-1, 1))


def column_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of each column of ``x`` ``(M, C)``: two ``(C,)`` tensors, no grad
    (torch's batch-norm kernel, ``eps=0`` as in :func:`instance_moments`)."""
    _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 0.0)
    return mean, _variance(invstd)


def traced_moments(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` over ``dim`` (kept for ``dim=-1`` of a 2-D ``x``, as
    :func:`row_moments`), differentiable: under ``torch.compile``, where the compiler fuses
    the reduction and the custom functions' hand-written backwards are not traced."""
    keepdim = dim == -1 and x.dim() == 2
    var, mean = torch.var_mean(x, dim, correction=0, keepdim=keepdim)
    return mean, var


def token_norm_reference(
    x: torch.Tensor, terms: Sequence[torch.Tensor], eps: float
) -> torch.Tensor:
    """:class:`TokenNorm`'s output with out-of-place ops that autograd differentiates."""
    mean_row, var_row, mean_col, var_col, scale, shift = terms
    rstd = torch.rsqrt((var_row + eps) + var_col)
    return (x - mean_row - mean_col) * rstd * scale + shift


def _position_sums(grad: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad * x).sum(-1)`` and ``grad.sum(-1)`` of two ``(N, C, S)`` tensors.

    For contiguous tensors these come from the reductions of torch's batch-norm backward kernel
    on the ``(1, N*C, S)`` view with mean 0 and inverse std 1: one pass over both tensors and no
    input-sized temporary (``torch.linalg.vecdot`` multiplies into one, then sums).
    """
    if not (grad.is_contiguous() and x.is_contiguous()):
        return torch.linalg.vecdot(grad, x), grad.sum(-1)
    n, c, size = x.shape
    ones = x.new_ones(n * c)
    _, grad_x_sum, grad_sum = torch.ops.aten.native_batch_norm_backward(
        grad.view(1, n * c, size),
        x.view(1, n * c, size),
        ones,
        None,
        None,
        x.new_zeros(n * c),
        ones,
        True,
        0.0,
        [False, True, True],
    )
    return grad_x_sum.view(n, c), grad_sum.view(n, c)


class PerChannelAffine(torch.autograd.Function):
    """``y[n, c, s] = x[n, c, s] * a[n, c] + b[n, c]`` where ``(a, b), extra = f(mean, var,
    *params)`` and ``mean, var`` are the biased per-(n, c) moments of ``x`` over s. Returns
    ``(y, extra)``: ``extra`` (not differentiated) hands results of the forward's ``f`` back.

    Only ``x`` is saved. The backward reduces the incoming gradient to per-(n, c) sums, runs
    autograd on the small graph ``f`` (recomputed), and maps the moment gradients back onto x::

        dx = g * a + (dL/dmean) / S + 2 (x - mean) (dL/dvar) / S
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        affine_from_stats: AffineFromStats,
        *params: torch.Tensor | None,
    ) -> tuple[torch.Tensor, Any]:
        (a, b), extra = affine_from_stats(mean, var, *params)
        ctx.affine_from_stats = affine_from_stats
        ctx.num_params = len(params)
        ctx.save_for_backward(x, mean, var, *[p for p in params if p is not None])
        ctx.param_is_none = [p is None for p in params]
        return torch.addcmul(b.unsqueeze(-1), x, a.unsqueeze(-1)), extra

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor, _extra: None):  # type: ignore[override]
        x, mean, var, *given = ctx.saved_tensors
        given_iter = iter(given)
        params = [None if is_none else next(given_iter) for is_none in ctx.param_is_none]
        with torch.enable_grad():
            mean_ = mean.detach().requires_grad_()
            var_ = var.detach().requires_grad_()
            leaves = [
                p.detach().requires_grad_(ctx.needs_input_grad[4 + i]) if p is not None else None
                for i, p in enumerate(params)
            ]
            (a, b), _ = ctx.affine_from_stats(mean_, var_, *leaves)
        size = x.shape[-1]
        grad_a, grad_b = _position_sums(grad_out, x)
        wanted = [mean_, var_] + [
            leaf for leaf in leaves if leaf is not None and leaf.requires_grad
        ]
        grads = torch.autograd.grad((a, b), wanted, (grad_a, grad_b), allow_unused=True)
        grad_mean, grad_var = (torch.zeros_like(mean) if g is None else g for g in grads[:2])
        param_grads = iter(grads[2:])
        out_param_grads = [
            next(param_grads) if leaf is not None and leaf.requires_grad else None
            for leaf in leaves
        ]
        grad_x = None
        if ctx.needs_input_grad[0]:
            scale = (2.0 / size) * grad_var
            if bool((mean.square() > 1e4 * var).any()):
                # |mean| over 100 std somewhere: x * scale and mean * scale would each be ~
                # mean * scale and their difference lose its digits (float32: 1-20% at a mean
                # of 1e3), so x is centred first, at one more pass over it
                grad_x = torch.addcmul(
                    (grad_mean / size).unsqueeze(-1), grad_out, a.detach().unsqueeze(-1)
                )
                grad_x.addcmul_(x - mean.unsqueeze(-1), scale.unsqueeze(-1))
            else:
                shift = grad_mean / size - scale * mean
                grad_x = torch.addcmul(shift.unsqueeze(-1), grad_out, a.detach().unsqueeze(-1))
                grad_x.addcmul_(x, scale.unsqueeze(-1))
        return (grad_x, None, None, None, *out_param_grads)


def _normalize_tokens(
    x: torch.Tensor,
    mean_row: torch.Tensor,
    var_row: torch.Tensor,
    mean_col: torch.Tensor,
    var_col: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - mean_row - mean_col) * rstd`` and ``rstd = rsqrt(var_row + var_col + eps)``."""
    rstd = ((var_row + eps) + var_col).rsqrt_()  # in place: one input-sized allocation
    return (x - mean_row).sub_(mean_col).mul_(rstd), rstd


class TokenNorm(torch.autograd.Function):
    """``y = (x - mean_row - mean_col) * rsqrt(var_row + var_col + eps) * scale + shift`` for
    tokens ``x`` ``(M, C)``, where ``f(row_mean, row_var, col_mean, col_var, *params)`` gives
    the row terms ``(M, 1)`` (per token), the column terms and ``scale, shift`` ``(C,)`` (per
    channel) from the biased moments of the rows and the columns of ``x``, and an ``extra``
    that comes back with ``y``, as in :class:`PerChannelAffine`.

    As in :class:`PerChannelAffine` only ``x`` and the moments are saved. The backward
    recomputes the normalized input, reduces the gradients of the mixed mean and variance over
    rows and over columns, runs autograd on ``f`` and maps the moment gradients back onto x.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        row_mean: torch.Tensor,
        row_var: torch.Tensor,
        col_mean: torch.Tensor,
        col_var: torch.Tensor,
        terms_from_stats: TermsFromStats,
        eps: float,
        *params: torch.Tensor | None,
    ) -> tuple[torch.Tensor, Any]:
        (mean_row, var_row, mean_col, var_col, scale, shift), extra = terms_from_stats(
            row_mean, row_var, col_mean, col_var, *params
        )
        ctx.terms_from_stats = terms_from_stats
        ctx.eps = eps
        ctx.param_is_none = [p is None for p in params]
        ctx.save_for_backward(
            x, row_mean, row_var, col_mean, col_var, *[p for p in params if p is not None]
        )
        out, _ = _normalize_tokens(x, mean_row, var_row, mean_col, var_col, eps)
        return out.mul_(scale).add_(shift), extra

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor, _extra: None):  # type: ignore[override]
        x, *moments = ctx.saved_tensors[:5]
        given = iter(ctx.saved_tensors[5:])
        params = [None if is_none else next(given) for is_none in ctx.param_is_none]
        first_param = 7  # index of params[0] among forward's inputs
        with torch.enable_grad():
            moment_leaves = [m.detach().requires_grad_() for m in moments]
            leaves = [
                p.detach().requires_grad_(ctx.needs_input_grad[first_param + i])
                if p is not None
                else None
                for i, p in enumerate(params)
            ]
            terms, _ = ctx.terms_from_stats(*moment_leaves, *leaves)
        mean_row, var_row, mean_col, var_col, scale, shift = (t.detach() for t in terms)
        xhat, rstd = _normalize_tokens(x, mean_row, var_row, mean_col, var_col, ctx.eps)
        grad_scale = torch.linalg.vecdot(grad_out, xhat, dim=0)
        grad_shift = grad_out.sum(0)
        direct = (grad_out * scale).mul_(rstd)  # dL/dx at fixed statistics; dL/dmean = -direct
        spread = xhat.mul_(rstd).mul_(direct)  # dL/dvar = -spread / 2
        term_grads = (
            -direct.sum(1, keepdim=True),
            spread.sum(1, keepdim=True).mul_(-0.5),
            -direct.sum(0),
            spread.sum(0).mul_(-0.5),
            grad_scale,
            grad_shift,
        )
        del spread, xhat
        wanted = moment_leaves + [p for p in leaves if p is not None and p.requires_grad]
        pairs = [(t, g) for t, g in zip(terms, term_grads, strict=True) if t.requires_grad]
        grads: Sequence[torch.Tensor | None] = [None] * len(wanted)
        if pairs:
            outputs, output_grads = zip(*pairs, strict=True)
            grads = torch.autograd.grad(outputs, wanted, output_grads, allow_unused=True)
        g_row_mean, g_row_var, g_col_mean, g_col_var = (
            torch.zeros_like(m) if g is None else g for m, g in zip(moments, grads[:4], strict=True)
        )
        param_grads = iter(grads[4:])
        out_param_grads = [
            next(param_grads) if p is not None and p.requires_grad else None for p in leaves
        ]
        grad_x = None
        if ctx.needs_input_grad[0]:
            rows, cols = x.shape
            row_mean, _, col_mean, _ = moments
            row_scale = (2.0 / cols) * g_row_var
            col_scale = (2.0 / rows) * g_col_var
            grad_x = direct.addcmul_(x, row_scale).addcmul_(x, col_scale)
            grad_x.add_(g_row_mean / cols - row_scale * row_mean)
            grad_x.add_(g_col_mean / rows - col_scale * col_mean)
        return (grad_x, None, None, None, None, None, None, *out_param_grads)
