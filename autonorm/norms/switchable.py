"""Switchable Normalization: a learned mix of instance, layer and batch statistics.

Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization", ICLR 2019.
For each candidate k the layer computes a mean ``mu_k`` and a variance ``var_k`` and normalizes
with ``mu = sum_k softmax(mean_weight)_k mu_k`` and ``var = sum_k softmax(var_weight)_k var_k``.

Channels-first layers take every statistic from one pass over the input: the per-(n, c) instance
mean and (biased) variance; the layer and batch statistics follow from them by the law of total
variance. All three are per-(n, c) quantities, so the output is ``x * a[n, c] + b[n, c]`` and the
backward needs only per-(n, c) reductions: a custom autograd function saves the input alone (as
BatchNorm does) and differentiates the small per-(n, c) graph with autograd.

Variances are biased, so one-hot mixing weights reproduce ``nn.InstanceNorm2d(affine=True)``,
``nn.GroupNorm(1, C)`` and ``nn.BatchNorm2d`` in training mode. Running statistics follow torch's
BatchNorm convention (unbiased variance, ``momentum=None`` for a cumulative average).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

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
        grad_out = grad_out.contiguous()
        size = x.shape[-1]
        grad_a = torch.bmm(grad_out.view(-1, 1, size), x.view(-1, size, 1)).view_as(a)
        grad_b = grad_out.sum(-1)
        wanted = [mean_, var_] + [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
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
        factory = {"device": device, "dtype": dtype}
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
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
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
        with torch.no_grad():
            var, mean = torch.var_mean(x3, dim=-1, unbiased=False)
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
            return a.to(x.dtype), b.to(x.dtype)

        self._pending_batch_stats = None
        out = _PerChannelAffine.apply(x3, mean, var, affine_from_stats, *self._params(x.dtype))
        if self._pending_batch_stats is not None:
            self._update_running(*self._pending_batch_stats, batch_count)
            self._pending_batch_stats = None
        return out.view_as(x)

    def _forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        mean_w_mask = None
        stats_mean: dict[str, torch.Tensor | float] = {}
        stats_var: dict[str, torch.Tensor] = {}
        if "layer" in self.candidates:
            var, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
            stats_mean["layer"], stats_var["layer"] = mean, var
        if "rms" in self.candidates:
            stats_mean["rms"] = 0.0
            stats_var["rms"] = x.square().mean(-1, keepdim=True)
        if "batch" in self.candidates:
            flat = x.reshape(-1, self.num_features)
            if self.training:
                world = _distributed_world()
                total = flat.shape[0]
                if world > 1:
                    count = torch.tensor([float(total)], device=x.device)
                    dist.all_reduce(count)
                    total = int(count.item())
                mean_w_mask = self._branch_mask(total > 1)
                if mean_w_mask is None:
                    batch_mean = _global_sum(flat.sum(0)) / total
                    batch_var = _global_sum((flat - batch_mean).square().sum(0)) / total
                    self._update_running(batch_mean.detach(), batch_var.detach(), total)
                else:
                    batch_mean, batch_var = flat.mean(0).detach(), torch.ones_like(flat[0])
            else:
                batch_mean = self.running_mean.to(x.dtype)
                batch_var = self.running_var.to(x.dtype)
            stats_mean["batch"], stats_var["batch"] = batch_mean, batch_var
        mean_w = self._mix(self.mean_weight, mean_w_mask).to(x.dtype)
        var_w = self._mix(self.var_weight, mean_w_mask).to(x.dtype)
        mixed_mean = sum(mean_w[i] * stats_mean[k] for i, k in enumerate(self.candidates))
        mixed_var = sum(var_w[i] * stats_var[k] for i, k in enumerate(self.candidates))
        out = (x - mixed_mean) * torch.rsqrt(mixed_var + self.eps)
        if self.affine:
            out = torch.addcmul(self.bias.to(x.dtype), out, self.weight.to(x.dtype))
        return out
