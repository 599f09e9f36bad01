"""The small-batch family: Batch Renormalization, Filter Response Normalization + TLU, EvoNorm-S0.

Each is written from its paper's equations, for both layouts (``channels_first`` ``(N, C, *)``,
``channels_last`` ``(..., C)``: positions are every dimension but the batch and the channels).

- :class:`BatchRenorm` (Ioffe, NeurIPS 2017) is a batch norm that corrects the batch statistics
  towards the running ones by ``r`` and ``d`` (treated as constants in the backward pass,
  clipped to ``[1/r_max, r_max]`` and ``[-d_max, d_max]``); inference is BatchNorm's.
- :class:`FilterResponseNorm` (Singh & Krishnan, CVPR 2020) divides by the root mean square over
  positions per sample and channel, then applies its Thresholded Linear Unit ``max(y, tau)``.
- :class:`EvoNormS0` (Liu et al., NeurIPS 2020) computes ``x * sigmoid(v * x) / group_std(x)``.

FRN and EvoNorm-S0 include their activation: they replace a norm and the activation after it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from autonorm.norms._fast_ops import (
    BatchRenormFunction,
    evonorm_s0,
    filter_response_norm,
    fused_dtype,
    tracing,
)
from autonorm.norms._layers import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    add_affine,
    check_layout,
    laid_out_like,
    reset_affine,
)

#: The paper's schedule (ImageNet, 130k steps): r_max and d_max stay at 1 and 0 for the first
#: 5000 steps, then grow linearly to their limits.
PAPER_WARMUP_STEPS = 5000
PAPER_RAMP_STEPS = 20000
#: :meth:`BatchRenorm.scale_schedule`'s shares of a shorter run: the same shape as the paper's.
WARMUP_SHARE = 0.05
RAMP_SHARE = 0.2


def _channels_dim(layout: str) -> int:
    return 1 if layout == CHANNELS_FIRST else -1


def _per_channel(tensor: torch.Tensor, ndim: int, layout: str) -> torch.Tensor:
    """A ``(C,)`` tensor shaped to broadcast over an input of rank ``ndim``."""
    if layout == CHANNELS_LAST:
        return tensor
    return tensor.reshape(-1, *([1] * (ndim - 2)))


def _check_input(module: Any, input: torch.Tensor, min_ndim: int) -> None:
    if input.dim() < min_ndim:
        raise ValueError(
            f"{type(module).__name__} expects an input of rank >= {min_ndim}, "
            f"got {tuple(input.shape)}"
        )
    channels = input.shape[_channels_dim(module.layout)]
    if channels != module.num_features:
        raise ValueError(
            f"{type(module).__name__} expects {module.num_features} channels "
            f"({module.layout}), got input of shape {tuple(input.shape)}"
        )


class BatchRenorm(_BatchNorm):
    """Batch Renormalization (Ioffe, NeurIPS 2017).

    In training, with batch statistics ``mu_B``, ``sigma_B`` and running ones ``mu``, ``sigma``
    (``sigma = sqrt(running_var + eps)``)::

        r = clip(sigma_B / sigma, 1 / r_max, r_max)     d = clip((mu_B - mu) / sigma, -d_max, d_max)
        y = weight * ((x - mu_B) / sigma_B * r + d) + bias

    with ``r`` and ``d`` constants for the gradient. ``r_max`` grows from 1 and ``d_max`` from 0
    after ``warmup_steps`` training batches, linearly over ``ramp_steps``, to their limits (until
    then the layer is BatchNorm). Inference, state dict and running statistics are BatchNorm's,
    so a trained layer folds into its feeder like one.

    Args:
        num_features: channels C.
        eps, momentum, affine, device, dtype: as ``nn.BatchNorm2d`` (running statistics are
            always tracked: the corrections need them).
        r_max: the limit of ``r`` (>= 1; the paper's 3).
        d_max: the limit of ``d`` (>= 0; the paper's 5).
        warmup_steps, ramp_steps: the schedule in training batches (default the paper's 5000
            and 20000; a Trainer run scales them to its length, :meth:`scale_schedule`).
        layout: ``channels_first`` or ``channels_last``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int | None = None,
        ramp_steps: int | None = None,
        layout: str = CHANNELS_FIRST,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self.layout = check_layout(layout)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        #: whether the schedule was given (then :meth:`scale_schedule` leaves it)
        self.given_schedule = warmup_steps is not None or ramp_steps is not None
        self.warmup_steps = PAPER_WARMUP_STEPS if warmup_steps is None else int(warmup_steps)
        self.ramp_steps = PAPER_RAMP_STEPS if ramp_steps is None else int(ramp_steps)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _check_input(self, input, 2)

    def scale_schedule(self, total_steps: int) -> None:
        """Fit the warm-up and ramp to a run of ``total_steps`` training batches (5% and 20%
        of it, the paper's shape) unless the schedule was given."""
        if self.given_schedule or total_steps <= 0:
            return
        self.warmup_steps = round(WARMUP_SHARE * total_steps)
        self.ramp_steps = max(1, round(RAMP_SHARE * total_steps))

    def limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` at the current step (``num_batches_tracked``)."""
        step = int(self.num_batches_tracked.item())  # type: ignore[union-attr]
        progress = min(max((step - self.warmup_steps) / max(self.ramp_steps, 1), 0.0), 1.0)
        return 1.0 + (self.r_max - 1.0) * progress, self.d_max * progress

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.layout == CHANNELS_LAST:
            flat = input.reshape(-1, input.shape[-1])
            return self._renorm(flat).reshape(input.shape)
        return laid_out_like(self._renorm(input), input)

    def _renorm(self, x: torch.Tensor) -> torch.Tensor:
        running_mean, running_var = self.running_mean, self.running_var
        assert running_mean is not None and running_var is not None
        if not self.training:
            return F.batch_norm(
                x, running_mean, running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.numel() // x.shape[1]
        if count <= 1:
            raise ValueError(
                f"BatchRenorm needs more than one value per channel in training, got input of "
                f"shape {tuple(x.shape)}"
            )
        r_max, d_max = self.limits()
        if fused_dtype(x) and not tracing(x):
            tracked = self.num_batches_tracked
            assert tracked is not None
            tracked.add_(1)
            factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
            running = (running_mean, running_var)
            limits = (r_max, d_max)
            return BatchRenormFunction.apply(
                x, self.weight, self.bias, running, factor, self.eps, limits
            )
        with torch.no_grad():  # plain ops: traced (torch.compile, export), half precision
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            sigma = (running_var + self.eps).sqrt()
            r = ((var + self.eps).sqrt() / sigma).clamp(1.0 / r_max, r_max)
            d = ((mean - running_mean) / sigma).clamp(-d_max, d_max)
            self._update_running(mean, var * (count / (count - 1)))
        # r and d are constants: the renormalized batch norm is a batch norm whose affine is
        # (weight * r, weight * d + bias), which keeps torch's fused kernel and its gradients
        weight = r if self.weight is None else self.weight * r
        bias = d if self.weight is None else self.weight * d
        if self.bias is not None:
            bias = bias + self.bias
        return F.batch_norm(
            x, None, None, weight.to(x.dtype), bias.to(x.dtype), True, 0.0, self.eps
        )

    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        tracked = self.num_batches_tracked
        assert tracked is not None and self.running_mean is not None
        assert self.running_var is not None
        tracked.add_(1)
        factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}, layout={self.layout}"
        )


class FilterResponseNorm(nn.Module):
    """Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan,
    CVPR 2020)::

        nu2 = mean over positions of x ** 2      (per sample and channel)
        y = max(weight * x / sqrt(nu2 + eps) + bias, tau)

    It replaces a norm and the activation after it. No batch dependence: training and
    inference compute the same.

    Args:
        num_features: channels C.
        eps: added to ``nu2`` (the paper's 1e-6).
        affine: learn ``weight`` and ``bias`` (``tau`` is always learned: it is the activation).
        layout: ``channels_first`` or ``channels_last``.
    """

    includes_activation = True
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        affine: bool = True,
        layout: str = CHANNELS_FIRST,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.layout = check_layout(layout)
        add_affine(self, num_features, affine, factory)
        self.tau = nn.Parameter(torch.empty(num_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)
        nn.init.zeros_(self.tau)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_input(self, input, 3)  # positions to average over
        channels_last = self.layout == CHANNELS_LAST
        out = filter_response_norm(input, self.weight, self.bias, self.tau, self.eps, channels_last)
        return out if channels_last else laid_out_like(out, input)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, layout={self.layout}"


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu et al., Evolving Normalization-Activation Layers, NeurIPS 2020)::

        y = x * sigmoid(v * x) / group_std(x) * weight + bias

    ``group_std`` is ``sqrt(var + eps)`` per sample over each group's channels and all
    positions (the biased variance, as the paper's moments). It replaces a norm and the
    activation after it; training and inference compute the same.

    Args:
        num_features: channels C.
        groups: channel groups (must divide C; the paper's 32 where it divides).
        eps: added to the group variance.
        affine: learn ``weight`` and ``bias`` (``v`` is always learned).
        layout: ``channels_first`` or ``channels_last``.
    """

    includes_activation = True
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        num_features: int,
        groups: int,
        eps: float = 1e-5,
        affine: bool = True,
        layout: str = CHANNELS_FIRST,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.groups = groups
        self.eps = eps
        self.affine = affine
        self.layout = check_layout(layout)
        add_affine(self, num_features, affine, factory)
        self.v = nn.Parameter(torch.empty(num_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)
        nn.init.ones_(self.v)

    def _grouped(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """``x`` viewed with each group's values along the reduced dims (``(N, G, -1)``, or
        ``(N, -1, G, C/G)`` channels-last), and those dims."""
        if self.layout == CHANNELS_LAST:
            shape = (x.shape[0], -1, self.groups, self.num_features // self.groups)
            return x.reshape(shape), (1, 3)
        return x.reshape(x.shape[0], self.groups, -1), (2,)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_input(self, input, 2)
        channels_last = self.layout == CHANNELS_LAST
        fused = evonorm_s0(
            input, self.groups, self.v, self.weight, self.bias, self.eps, channels_last
        )
        if fused is not None:
            return fused if channels_last else laid_out_like(fused, input)
        ndim = input.dim()
        grouped, dims = self._grouped(input)
        std = (grouped.var(dim=dims, correction=0, keepdim=True) + self.eps).sqrt()
        gated = input * torch.sigmoid(input * _per_channel(self.v, ndim, self.layout))
        # divided per group on the grouped view: no input-sized copy of the group std
        out = (self._grouped(gated)[0] / std).reshape(input.shape)
        if self.weight is not None and self.bias is not None:
            weight = _per_channel(self.weight, ndim, self.layout)
            return torch.addcmul(_per_channel(self.bias, ndim, self.layout), out, weight)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, groups={self.groups}, eps={self.eps}, affine={self.affine}, "
            f"layout={self.layout}"
        )
