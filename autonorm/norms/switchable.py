"""Switchable Normalization: a learned mix of instance, layer and batch statistics.

Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization", ICLR 2019.
For each candidate k the layer computes a mean ``mu_k`` and a variance ``var_k`` and normalizes
with ``mu = sum_k softmax(mean_weight)_k mu_k`` and ``var = sum_k softmax(var_weight)_k var_k``.

Channels-first layers take every statistic from one pass over the input: the per-(n, c) instance
mean and (biased) variance; the layer and batch statistics follow from them by the law of total
variance. All three are per-(n, c) quantities, so the output is ``x * a[n, c] + b[n, c]`` and the
backward needs only per-(n, c) reductions: a custom autograd function saves the input alone (as
BatchNorm does) and differentiates the small per-(n, c) graph with autograd.

Channels-last layers (tokens ``(..., C)``) mix per-token statistics (layer, rms) with per-channel
ones (batch): the mixed mean and variance are a row term plus a column term. A second custom
function saves only the input and the row and column moments, and recomputes the normalized
input in the backward, so the layer keeps one input-sized tensor for the backward, like LayerNorm.

The moments, and the per-(n, c) sums of the channels-first backward, come from torch's fused
normalization kernels (group norm with one group per channel, layer norm, batch norm), which are
vectorized where ``torch.var_mean`` is not and need no input-sized temporaries.

Variances are biased, so one-hot mixing weights reproduce ``nn.InstanceNorm2d(affine=True)``,
``nn.GroupNorm(1, C)`` and ``nn.BatchNorm2d`` in training mode. Running statistics follow torch's
BatchNorm convention (unbiased variance, ``momentum=None`` for a cumulative average).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from autonorm.norms.layers import CHANNELS_FIRST, CHANNELS_LAST, check_layout

#: Candidate statistics a SwitchableNorm may mix, per layout.
SWITCHABLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    CHANNELS_FIRST: ("instance", "layer", "batch"),
    CHANNELS_LAST: ("layer", "rms", "batch"),
}
#: The paper's defaults: channels-first IN/LN/BN; tokens LN/RMS/BN.
DEFAULT_CANDIDATES = SWITCHABLE_CANDIDATES

_HALF_DTYPES = (torch.float16, torch.bfloat16)

AffineFromStats = Callable[..., tuple[torch.Tensor, torch.Tensor]]
TermsFromStats = Callable[..., tuple[torch.Tensor, ...]]


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the backward sums the gradients too (each rank's loss depends on the
    global sum, as in SyncBatchNorm)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _global_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor) if _distributed_world() > 1 else tensor


def _instance_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def _row_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of each row of ``x`` ``(M, C)``: two ``(M, 1)`` tensors, no grad
    (torch's fused layer-norm kernel, as in :func:`_instance_moments`)."""
    _, mean, rstd = torch.native_layer_norm(x.contiguous(), x.shape[-1:], None, None, 0.0)
    return mean.view(-1, 1), _variance(rstd.view(-1, 1))


def _column_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of each column of ``x`` ``(M, C)``: two ``(C,)`` tensors, no grad
    (torch's batch-norm kernel, ``eps=0`` as in :func:`_instance_moments`)."""
    _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 0.0)
    return mean, _variance(invstd)


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


class _PerChannelAffine(torch.autograd.Function):
    """``y[n, c, s] = x[n, c, s] * a[n, c] + b[n, c]`` where ``(a, b) = f(mean, var, *params)``
    and ``mean, var`` are the biased per-(n, c) moments of ``x`` over s.

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
    ) -> torch.Tensor:
        a, b = affine_from_stats(mean, var, *params)
        ctx.affine_from_stats = affine_from_stats
        ctx.num_params = len(params)
        ctx.save_for_backward(x, mean, var, *[p for p in params if p is not None])
        ctx.param_is_none = [p is None for p in params]
        return torch.addcmul(b.unsqueeze(-1), x, a.unsqueeze(-1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
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
            a, b = ctx.affine_from_stats(mean_, var_, *leaves)
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
    rstd = torch.rsqrt((var_row + eps) + var_col)
    return (x - mean_row).sub_(mean_col).mul_(rstd), rstd


class _TokenNorm(torch.autograd.Function):
    """``y = (x - mean_row - mean_col) * rsqrt(var_row + var_col + eps) * scale + shift`` for
    tokens ``x`` ``(M, C)``, where ``f(row_mean, row_var, col_mean, col_var, *params)`` gives
    the row terms ``(M, 1)`` (per token), the column terms and ``scale, shift`` ``(C,)`` (per
    channel) from the biased moments of the rows and the columns of ``x``.

    As in :class:`_PerChannelAffine` only ``x`` and the moments are saved. The backward
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
    ) -> torch.Tensor:
        mean_row, var_row, mean_col, var_col, scale, shift = terms_from_stats(
            row_mean, row_var, col_mean, col_var, *params
        )
        ctx.terms_from_stats = terms_from_stats
        ctx.eps = eps
        ctx.param_is_none = [p is None for p in params]
        ctx.save_for_backward(
            x, row_mean, row_var, col_mean, col_var, *[p for p in params if p is not None]
        )
        out, _ = _normalize_tokens(x, mean_row, var_row, mean_col, var_col, eps)
        return out.mul_(scale).add_(shift)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
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
            terms = ctx.terms_from_stats(*moment_leaves, *leaves)
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


class SwitchableNorm(nn.Module):
    """Switchable Normalization (Luo et al., ICLR 2019).

    Args:
        num_features: number of channels C.
        layout: ``"channels_first"`` for ``(N, C, *)`` or ``"channels_last"`` for ``(..., C)``.
        candidates: statistics to mix. Channels-first: ``"instance"`` (per (n, c) over
            positions), ``"layer"`` (per n over C and positions), ``"batch"`` (per c over N and
            positions). Channels-last: ``"layer"`` (per token over C), ``"rms"`` (per token, zero
            mean and mean-of-squares variance), ``"batch"`` (per c over all tokens). Defaults:
            ``("instance", "layer", "batch")`` and ``("layer", "rms", "batch")``.
        eps: added to the mixed variance.
        momentum: running-statistics momentum of the batch branch (``None``: cumulative).
        affine: learn per-channel ``weight`` and ``bias``.

    Attributes:
        mean_weight, var_weight: learnable logits, one per candidate in ``candidates`` order;
            their softmax weighs the candidates' means and variances.
        running_mean, running_var: the batch branch's running statistics (eval mode).

    In training the batch statistics are synchronized across processes when
    ``torch.distributed`` is initialized with more than one process. Statistics are computed in
    float32 for half-precision inputs and under autocast.

    Example::

        >>> sn = SwitchableNorm(8)
        >>> sn(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
        >>> sn.candidates
        ('instance', 'layer', 'batch')
    """

    def __init__(
        self,
        num_features: int,
        *,
        layout: str = CHANNELS_FIRST,
        candidates: Sequence[str] | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        layout = check_layout(layout)
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"`num_features` must be a positive int, got {num_features!r}")
        allowed = SWITCHABLE_CANDIDATES[layout]
        candidates = tuple(DEFAULT_CANDIDATES[layout] if candidates is None else candidates)
        unknown = [c for c in candidates if c not in allowed]
        if unknown or not candidates or len(set(candidates)) != len(candidates):
            raise ValueError(
                f"`candidates` must be distinct names from {allowed} for layout {layout!r}, "
                f"got {candidates}"
            )
        if eps <= 0:
            raise ValueError(f"`eps` must be > 0, got {eps}")
        self.num_features = num_features
        self.layout = layout
        self.candidates: tuple[str, ...] = candidates
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.mean_weight = nn.Parameter(torch.empty(len(candidates), **factory))
        self.var_weight = nn.Parameter(torch.empty(len(candidates), **factory))
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if "batch" in candidates:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.running_mean is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.mean_weight)  # equal logits: the paper's uniform start
        nn.init.ones_(self.var_weight)
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, layout={self.layout!r}, candidates={self.candidates}, "
            f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        )

    def mixing_weights(self) -> dict[str, dict[str, float]]:
        """The current softmax weights per candidate: ``{"mean": {...}, "var": {...}}``."""
        with torch.no_grad():
            mean = self._mix(self.mean_weight, None).tolist()
            var = self._mix(self.var_weight, None).tolist()
        return {
            "mean": dict(zip(self.candidates, mean, strict=True)),
            "var": dict(zip(self.candidates, var, strict=True)),
        }

    # -- forward ------------------------------------------------------------------------------

    def _branch_mask(self, batch_defined: bool) -> torch.Tensor | None:
        """Logit mask that drops the batch branch when its statistics are undefined."""
        if batch_defined or "batch" not in self.candidates:
            return None
        if len(self.candidates) == 1:
            raise ValueError(
                "SwitchableNorm with candidates=('batch',) needs more than one sample per "
                "batch in training (got a batch of 1)"
            )
        warnings.warn(
            "SwitchableNorm got a training batch of one sample: its batch statistics are "
            "undefined, so the batch branch is left out of this step and the running "
            "statistics are not updated. Train with batches of 2 or more samples.",
            RuntimeWarning,
            stacklevel=3,
        )
        mask = torch.zeros(len(self.candidates))
        mask[self.candidates.index("batch")] = float("-inf")
        return mask

    def _mix(self, logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if logits.dtype in _HALF_DTYPES:
            logits = logits.float()
        if mask is not None:
            logits = logits + mask.to(logits.device, logits.dtype)
        return torch.softmax(logits, 0)

    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        if count < 2:
            return
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            unbiased = var * (count / (count - 1))
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        channel_dim = 1 if self.layout == CHANNELS_FIRST else -1
        if input.dim() < 2 or input.shape[channel_dim] != self.num_features:
            expected = "(N, C, *)" if self.layout == CHANNELS_FIRST else "(..., C)"
            raise ValueError(
                f"SwitchableNorm({self.num_features}, layout={self.layout!r}) expects an input "
                f"{expected} with C={self.num_features}, got {tuple(input.shape)}"
            )
        with torch.autocast(input.device.type, enabled=False):
            x = input.float() if input.dtype in _HALF_DTYPES else input
            if self.layout == CHANNELS_FIRST:
                out = self._forward_channels_first(x)
            else:
                out = self._forward_channels_last(x)
        return out.to(input.dtype)

    def _params(self, dtype: torch.dtype) -> list[torch.Tensor | None]:
        return [
            self.mean_weight,
            self.var_weight,
            None if self.weight is None else self.weight.to(dtype),
            None if self.bias is None else self.bias.to(dtype),
        ]

    def _forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        if x3.shape[-1] == 0:
            raise ValueError(f"SwitchableNorm got an input with no positions: {tuple(x.shape)}")
        mean, var = _instance_moments(x3.detach())
        world = _distributed_world()
        use_batch = "batch" in self.candidates
        batch_count = 0
        mask = None
        if use_batch and self.training:
            total_n = n
            if world > 1:
                count = torch.tensor([float(n)], device=x.device)
                dist.all_reduce(count)
                total_n = int(count.item())
            mask = self._branch_mask(total_n > 1)
            batch_count = total_n * x3.shape[-1] if mask is None else 0
        training = self.training
        dtype = x.dtype  # not x itself: the function's saved tensors are the only references

        def affine_from_stats(
            mean: torch.Tensor,
            var: torch.Tensor,
            mean_logits: torch.Tensor,
            var_logits: torch.Tensor,
            weight: torch.Tensor | None,
            bias: torch.Tensor | None,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            stats = {}
            if "instance" in self.candidates:
                stats["instance"] = (mean, var)
            if "layer" in self.candidates:
                layer_mean = mean.mean(1, keepdim=True)
                layer_var = (var + (mean - layer_mean).square()).mean(1, keepdim=True)
                stats["layer"] = (layer_mean, layer_var)
            if "batch" in self.candidates:
                if training and mask is None:
                    batch_mean = _global_sum(mean.sum(0, keepdim=True)) / total_n
                    spread = var + (mean - batch_mean).square()
                    batch_var = _global_sum(spread.sum(0, keepdim=True)) / total_n
                elif training:  # batch branch dropped: weight 0, any finite stand-in
                    batch_mean, batch_var = mean, var
                else:
                    batch_mean = self.running_mean.to(mean.dtype).unsqueeze(0)
                    batch_var = self.running_var.to(mean.dtype).unsqueeze(0)
                stats["batch"] = (batch_mean, batch_var)
            mean_w = self._mix(mean_logits, mask)
            var_w = self._mix(var_logits, mask)
            mixed_mean = sum(mean_w[i] * stats[k][0] for i, k in enumerate(self.candidates))
            mixed_var = sum(var_w[i] * stats[k][1] for i, k in enumerate(self.candidates))
            a = torch.rsqrt(mixed_var + self.eps).expand(mean.shape)
            if weight is not None:
                a = a * weight
            b = -mixed_mean * a
            if bias is not None:
                b = b + bias
            if training and batch_count and not torch.is_grad_enabled():
                self._pending_batch_stats = (stats["batch"][0][0], stats["batch"][1][0])
            return a.to(dtype), b.to(dtype)

        self._pending_batch_stats = None
        out = _PerChannelAffine.apply(x3, mean, var, affine_from_stats, *self._params(x.dtype))
        if self._pending_batch_stats is not None:
            self._update_running(*self._pending_batch_stats, batch_count)
            self._pending_batch_stats = None
        return out.reshape(x.shape)

    def _forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.num_features)
        rows = flat.shape[0]
        if rows == 0:
            raise ValueError(f"SwitchableNorm got an input with no tokens: {tuple(x.shape)}")
        zeros_row = flat.new_zeros(rows, 1)
        zeros_col = flat.new_zeros(self.num_features)
        if "layer" in self.candidates or "rms" in self.candidates:
            row_mean, row_var = _row_moments(flat.detach())
        else:
            row_mean, row_var = zeros_row, zeros_row
        training = self.training
        use_batch_stats = "batch" in self.candidates and training
        mask = None
        total = rows
        if use_batch_stats:
            if _distributed_world() > 1:
                count = torch.tensor([float(rows)], device=x.device)
                dist.all_reduce(count)
                total = int(count.item())
            mask = self._branch_mask(total > 1)
            col_mean, col_var = _column_moments(flat.detach())
        else:
            col_mean, col_var = zeros_col, zeros_col
        batch_count = total if use_batch_stats and mask is None else 0

        def terms_from_stats(
            row_mean: torch.Tensor,
            row_var: torch.Tensor,
            col_mean: torch.Tensor,
            col_var: torch.Tensor,
            mean_logits: torch.Tensor,
            var_logits: torch.Tensor,
            weight: torch.Tensor | None,
            bias: torch.Tensor | None,
        ) -> tuple[torch.Tensor, ...]:
            stats = {
                "layer": (row_mean, row_var),
                "rms": (zeros_row, row_var + row_mean.square()),  # mean of squares
            }
            if "batch" in self.candidates:
                if training and mask is None:
                    batch_mean = _global_sum(col_mean * rows) / total
                    spread = (col_var + (col_mean - batch_mean).square()) * rows
                    batch_var = _global_sum(spread) / total
                    if not torch.is_grad_enabled():
                        self._pending_batch_stats = (batch_mean, batch_var)
                elif training:  # batch branch dropped: weight 0, any finite stand-in
                    batch_mean, batch_var = col_mean, col_var
                else:
                    batch_mean = self.running_mean.to(col_mean.dtype)
                    batch_var = self.running_var.to(col_mean.dtype)
                stats["batch"] = (batch_mean, batch_var)
            mean_w = self._mix(mean_logits, mask)
            var_w = self._mix(var_logits, mask)
            mean_row = var_row = zeros_row  # per-token terms of the mixed mean and variance
            mean_col = var_col = zeros_col  # per-channel terms: the batch candidate
            for i, name in enumerate(self.candidates):
                mean, var = stats[name]
                if name == "batch":
                    mean_col = mean_col + mean_w[i] * mean
                    var_col = var_col + var_w[i] * var
                else:
                    mean_row = mean_row + mean_w[i] * mean
                    var_row = var_row + var_w[i] * var
            scale = torch.ones_like(zeros_col) if weight is None else weight
            shift = zeros_col if bias is None else bias
            return mean_row, var_row, mean_col, var_col, scale, shift

        self._pending_batch_stats = None
        out = _TokenNorm.apply(
            flat,
            row_mean,
            row_var,
            col_mean,
            col_var,
            terms_from_stats,
            self.eps,
            *self._params(x.dtype),
        )
        if self._pending_batch_stats is not None:
            self._update_running(*self._pending_batch_stats, batch_count)
            self._pending_batch_stats = None
        return out.reshape(x.shape)
