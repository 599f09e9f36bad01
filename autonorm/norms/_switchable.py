"""Switchable Normalization: a learned mix of instance, layer and batch statistics.

Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization", ICLR 2019.
For each candidate k the layer computes a mean ``mu_k`` and a variance ``var_k`` and normalizes
with ``mu = sum_k softmax(mean_weight)_k mu_k`` and ``var = sum_k softmax(var_weight)_k var_k``.

Channels-first layers compute every statistic from the per-(n, c) instance moments;
channels-last layers (tokens) mix per-token and per-channel terms. The kernels and custom
autograd functions that keep one input-sized tensor for the backward live in
:mod:`autonorm.norms._switchable_ops`.

With ``mixing="sparsestmax"`` (Sparse SN, Shao et al., CVPR 2019) the weights are
:func:`~autonorm.norms._sparsestmax.sparsestmax` of the logits at the layer's ``radius``: sparse,
and one-hot once the radius reaches :attr:`SwitchableNorm.vertex_radius` (a schedule grows it
during training, e.g. ``AutoNorm(mode="learn", mixing="sparsestmax")``). Unlike the paper, one
set of weights, from the average of the mean and variance logits, mixes both: a one-hot layer is
then one native normalizer, not a mean from one and a variance from another, so the config
derived from it is the layer the model trained with.

Variances are biased, so one-hot mixing weights reproduce ``nn.InstanceNorm2d(affine=True)``,
``nn.GroupNorm(1, C)`` and ``nn.BatchNorm2d`` in training mode. Running statistics follow torch's
BatchNorm convention (unbiased variance, ``momentum=None`` for a cumulative average).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from autonorm.norms._fast_ops import tracing
from autonorm.norms._layers import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    add_affine,
    check_layout,
    reset_affine,
)
from autonorm.norms._sparsestmax import sparsestmax, vertex_radius
from autonorm.norms._switchable_ops import (
    PerChannelAffine,
    TokenNorm,
    column_moments,
    instance_moments,
    row_moments,
    token_norm_reference,
    traced_moments,
)
from autonorm.norms._sync import all_reduce_sum

#: Candidate statistics a SwitchableNorm may mix, per layout; all of them are the defaults
#: (the paper's channels-first IN/LN/BN; tokens LN/RMS/BN).
SWITCHABLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    CHANNELS_FIRST: ("instance", "layer", "batch"),
    CHANNELS_LAST: ("layer", "rms", "batch"),
}

#: How the mixing logits become weights: the paper's softmax, or Sparse SN's sparsestmax.
SWITCHABLE_MIXINGS = ("softmax", "sparsestmax")

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_mixing(mixing: str, radius: float) -> None:
    if mixing not in SWITCHABLE_MIXINGS:
        raise ValueError(f"`mixing` must be one of {SWITCHABLE_MIXINGS}, got {mixing!r}")
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius >= 0):
        raise ValueError(f"`radius` must be a finite number >= 0, got {radius!r}")
    if radius and mixing != "sparsestmax":
        raise ValueError(f"`radius` applies to mixing='sparsestmax', got mixing={mixing!r}")


def _records_stats() -> bool:
    """Whether a statistics function runs in the forward, where it records the step's batch
    statistics: the custom functions' forwards run without grad and their backwards recompute
    with it; a compiled forward calls the function once, with grad."""
    return not torch.is_grad_enabled() or torch.compiler.is_compiling()


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _global_sum(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) if _distributed_world() > 1 else tensor


def _local_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Eval-mode batch statistics (no running statistics) stay per process, as BatchNorm's."""
    return tensor


def _global_count(count: int, device: torch.device) -> int:
    """``count`` summed over the processes of the run (the global batch, or token count)."""
    if _distributed_world() <= 1:
        return count
    total = torch.tensor([float(count)], device=device)
    dist.all_reduce(total)
    return int(total.item())


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
        track_running_stats: keep the batch branch's running statistics for eval mode (False:
            the batch branch reads the input's statistics in eval mode too, as BatchNorm).
        mixing: ``"softmax"`` (SN) or ``"sparsestmax"`` (Sparse SN): how the logits become
            weights.
        radius: sparsestmax only: the initial :attr:`radius` (0: sparsemax).

    Attributes:
        mean_weight, var_weight: learnable logits, one per candidate in ``candidates`` order;
            their softmax (or sparsestmax) weighs the candidates' means and variances.
        running_mean, running_var: the batch branch's running statistics (eval mode).
        radius: sparsestmax only: a scalar buffer (saved in the state dict), the least distance
            of the weights from the uniform mix; at :attr:`vertex_radius` they are one-hot.
            The mean and the variance then share one set of weights, the sparsestmax of
            ``(mean_weight + var_weight) / 2``.

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

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    radius: torch.Tensor | None
    #: The batch statistics of the step in flight, set by the forward's statistics function.
    _pending_batch_stats: tuple[torch.Tensor, torch.Tensor] | None

    def __init__(
        self,
        num_features: int,
        *,
        layout: str = CHANNELS_FIRST,
        candidates: Sequence[str] | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        mixing: str = "softmax",
        radius: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        layout = check_layout(layout)
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"`num_features` must be a positive int, got {num_features!r}")
        allowed = SWITCHABLE_CANDIDATES[layout]
        candidates = tuple(allowed if candidates is None else candidates)
        unknown = [c for c in candidates if c not in allowed]
        if unknown or not candidates or len(set(candidates)) != len(candidates):
            raise ValueError(
                f"`candidates` must be distinct names from {allowed} for layout {layout!r}, "
                f"got {candidates}"
            )
        if eps <= 0:
            raise ValueError(f"`eps` must be > 0, got {eps}")
        _check_mixing(mixing, radius)
        self.num_features = num_features
        self.layout = layout
        self.candidates: tuple[str, ...] = candidates
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.mixing = mixing
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.mean_weight = nn.Parameter(torch.empty(len(candidates), **factory))
        self.var_weight = nn.Parameter(torch.empty(len(candidates), **factory))
        add_affine(self, num_features, affine, factory)
        if "batch" in candidates and track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        # only Sparse SN has one: a softmax SN's state dict stays as it was
        initial = torch.tensor(float(radius), **factory) if mixing == "sparsestmax" else None
        self.register_buffer("radius", initial)
        self.reset_parameters()

    @property
    def vertex_radius(self) -> float:
        """The radius at which sparsestmax weights are one-hot: ``sqrt((K - 1) / K)``."""
        return vertex_radius(len(self.candidates))

    def _running_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch branch's buffers: running mean, running variance, batches tracked."""
        mean, var, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        assert mean is not None and var is not None and tracked is not None, "no batch branch"
        return mean, var, tracked

    def reset_running_stats(self) -> None:
        if self.running_mean is not None:
            mean, var, tracked = self._running_stats()
            mean.zero_()
            var.fill_(1)
            tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.mean_weight)  # equal logits: the paper's uniform start
        nn.init.ones_(self.var_weight)
        reset_affine(self)

    def start_on(self, candidate: str, weight: float = 0.99) -> None:
        """Set the mixing logits so that ``candidate`` gets ``weight`` of the mix and the
        others share the rest: a layer that replaced a pretrained normalizer of that kind
        computes nearly what it did, and its mixing can still learn (the logits are not at a
        vertex, where sparsestmax has no gradient). Softmax logits are the weights' logs;
        sparsestmax keeps a point of the simplex as it is.

        Raises:
            ValueError: ``candidate`` is not one of :attr:`candidates`, or ``weight`` is not in
                (0, 1).
        """
        if candidate not in self.candidates:
            raise ValueError(f"`candidate` must be one of {self.candidates}, got {candidate!r}")
        if not 0 < weight < 1:
            raise ValueError(f"`weight` must be in (0, 1), got {weight!r}")
        k = len(self.candidates)
        rest = (1 - weight) / (k - 1) if k > 1 else 0.0
        target = torch.full((k,), rest, dtype=torch.float64)
        target[self.candidates.index(candidate)] = weight if k > 1 else 1.0
        logits = target.log() if self.radius is None else target
        with torch.no_grad():
            self.mean_weight.copy_(logits)
            self.var_weight.copy_(logits)

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, layout={self.layout!r}, candidates={self.candidates}, "
            f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        )
        if not self.track_running_stats:
            text += ", track_running_stats=False"
        if self.radius is not None:
            text += f", mixing={self.mixing!r}, radius={float(self.radius):.4g}"
        return text

    def mixing_weights(self) -> dict[str, dict[str, float]]:
        """The current weights per candidate (softmax or sparsestmax, as the layer mixes):
        ``{"mean": {...}, "var": {...}}``."""
        with torch.no_grad():
            if self.radius is None:
                mean = self._mix(self.mean_weight, None).tolist()
                var = self._mix(self.var_weight, None).tolist()
            else:
                mean = var = self._sparse_weights(None).tolist()
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
        if self.radius is not None:
            allowed = None if mask is None else mask.to(logits.device) == 0
            return sparsestmax(logits, self.radius, allowed)
        if mask is not None:
            logits = logits + mask.to(logits.device, logits.dtype)
        return torch.softmax(logits, 0)

    def _sparse_weights(self, mask: torch.Tensor | None) -> torch.Tensor:
        """Sparse SN's one set of weights for the mean and the variance (both logits train)."""
        return self._mix((self.mean_weight + self.var_weight) / 2, mask)

    def _mixing_inputs(self, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the statistics functions get for the mean and variance mixing: the logits
        (softmax is applied inside them), or the sparsestmax weights, projected once a forward
        rather than again in the custom backward."""
        if self.radius is None:
            return self.mean_weight, self.var_weight
        weights = self._sparse_weights(mask)
        return weights, weights

    def _mixed(self, given: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The weights from what :meth:`_mixing_inputs` gave."""
        return self._mix(given, mask) if self.radius is None else given

    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        if count < 2 or not self.track_running_stats:
            return
        running_mean, running_var, tracked = self._running_stats()
        with torch.no_grad():
            tracked.add_(1)
            factor: float | torch.Tensor
            if self.momentum is not None:
                factor = self.momentum
            elif torch.compiler.is_compiling():
                factor = 1.0 / tracked.to(running_mean.dtype)  # float() would break the graph
            else:
                factor = 1.0 / float(tracked)  # as BatchNorm, for the same rounding
            unbiased = var * (count / (count - 1))
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
            running_var.lerp_(unbiased.to(running_var.dtype), factor)

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

    def _batch_stats_of_input(self) -> bool:
        """Whether the batch branch reads the input's statistics (training, or always without
        running statistics, as BatchNorm with ``track_running_stats=False``)."""
        return self.training or not self.track_running_stats

    def _params(self, dtype: torch.dtype, mask: torch.Tensor | None) -> list[torch.Tensor | None]:
        return [
            *self._mixing_inputs(mask),
            None if self.weight is None else self.weight.to(dtype),
            None if self.bias is None else self.bias.to(dtype),
        ]

    def _forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        if x3.shape[-1] == 0:
            raise ValueError(f"SwitchableNorm got an input with no positions: {tuple(x.shape)}")
        traced = tracing(x3)
        mean, var = traced_moments(x3, -1) if traced else instance_moments(x3.detach())
        use_batch = "batch" in self.candidates
        batch_count = 0
        mask = None
        total_n = n
        batch_from_input = self._batch_stats_of_input()
        reduce = _global_sum if self.training else _local_sum
        if use_batch and batch_from_input:
            total_n = _global_count(n, x.device) if self.training else n
            mask = self._branch_mask(total_n > 1)
            batch_count = total_n * x3.shape[-1] if mask is None else 0
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
                if batch_from_input and mask is None:
                    batch_mean = reduce(mean.sum(0, keepdim=True)) / total_n
                    spread = var + (mean - batch_mean).square()
                    batch_var = reduce(spread.sum(0, keepdim=True)) / total_n
                elif batch_from_input:  # batch branch dropped: weight 0, any finite stand-in
                    batch_mean, batch_var = mean, var
                else:
                    running_mean, running_var, _ = self._running_stats()
                    batch_mean = running_mean.to(mean.dtype).unsqueeze(0)
                    batch_var = running_var.to(mean.dtype).unsqueeze(0)
                stats["batch"] = (batch_mean, batch_var)
            mean_w = self._mixed(mean_logits, mask)
            var_w = self._mixed(var_logits, mask)
            mixed_mean = sum(mean_w[i] * stats[k][0] for i, k in enumerate(self.candidates))
            mixed_var = cast(
                torch.Tensor, sum(var_w[i] * stats[k][1] for i, k in enumerate(self.candidates))
            )
            a = torch.rsqrt(mixed_var + self.eps).expand(mean.shape)
            if weight is not None:
                a = a * weight
            b = -mixed_mean * a
            if bias is not None:
                b = b + bias
            if batch_from_input and batch_count and _records_stats():
                self._pending_batch_stats = (stats["batch"][0][0], stats["batch"][1][0])
            return a.to(dtype), b.to(dtype)

        self._pending_batch_stats = None
        params = self._params(x.dtype, mask)
        if traced:  # plain ops that the compiler fuses and differentiates itself
            a, b = affine_from_stats(mean, var, *cast(list[Any], params))
            out = torch.addcmul(b.unsqueeze(-1), x3, a.unsqueeze(-1))
        else:
            out = PerChannelAffine.apply(x3, mean, var, affine_from_stats, *params)
        if self._pending_batch_stats is not None:
            self._update_running(*self._pending_batch_stats, batch_count)
            self._pending_batch_stats = None
        return out.reshape(x.shape)

    def _token_terms(
        self,
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
        mean_w: torch.Tensor,
        var_w: torch.Tensor,
        zeros_row: torch.Tensor,
        zeros_col: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mixed mean and variance of tokens as per-token (row) terms, from the layer and
        rms candidates, and per-channel (column) terms, from the batch candidate."""
        mean_row = var_row = zeros_row
        mean_col = var_col = zeros_col
        for i, name in enumerate(self.candidates):
            mean, var = stats[name]
            if name == "batch":
                mean_col = mean_col + mean_w[i] * mean
                var_col = var_col + var_w[i] * var
            else:
                mean_row = mean_row + mean_w[i] * mean
                var_row = var_row + var_w[i] * var
        return mean_row, var_row, mean_col, var_col

    def _forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.num_features)
        rows = flat.shape[0]
        if rows == 0:
            raise ValueError(f"SwitchableNorm got an input with no tokens: {tuple(x.shape)}")
        zeros_row = flat.new_zeros(rows, 1)
        zeros_col = flat.new_zeros(self.num_features)
        traced = tracing(flat)
        if "layer" in self.candidates or "rms" in self.candidates:
            row_mean, row_var = traced_moments(flat, -1) if traced else row_moments(flat.detach())
        else:
            row_mean, row_var = zeros_row, zeros_row
        batch_from_input = self._batch_stats_of_input()
        reduce = _global_sum if self.training else _local_sum
        use_batch_stats = "batch" in self.candidates and batch_from_input
        mask = None
        total = rows
        if use_batch_stats:
            total = _global_count(rows, x.device) if self.training else rows
            mask = self._branch_mask(total > 1)
            col_mean, col_var = traced_moments(flat, 0) if traced else column_moments(flat.detach())
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
                if batch_from_input and mask is None:
                    batch_mean = reduce(col_mean * rows) / total
                    spread = (col_var + (col_mean - batch_mean).square()) * rows
                    batch_var = reduce(spread) / total
                    if _records_stats():
                        self._pending_batch_stats = (batch_mean, batch_var)
                elif batch_from_input:  # batch branch dropped: weight 0, any finite stand-in
                    batch_mean, batch_var = col_mean, col_var
                else:
                    running_mean, running_var, _ = self._running_stats()
                    batch_mean = running_mean.to(col_mean.dtype)
                    batch_var = running_var.to(col_mean.dtype)
                stats["batch"] = (batch_mean, batch_var)
            mean_w = self._mixed(mean_logits, mask)
            var_w = self._mixed(var_logits, mask)
            terms = self._token_terms(stats, mean_w, var_w, zeros_row, zeros_col)
            scale = torch.ones_like(zeros_col) if weight is None else weight
            shift = zeros_col if bias is None else bias
            return *terms, scale, shift

        self._pending_batch_stats = None
        params = self._params(x.dtype, mask)
        if traced:  # plain ops that the compiler fuses and differentiates itself
            terms = terms_from_stats(row_mean, row_var, col_mean, col_var, *cast(list[Any], params))
            out = token_norm_reference(flat, terms, self.eps)
        else:
            out = TokenNorm.apply(
                flat, row_mean, row_var, col_mean, col_var, terms_from_stats, self.eps, *params
            )
        if self._pending_batch_stats is not None:
            self._update_running(*self._pending_batch_stats, batch_count)
            self._pending_batch_stats = None
        return out.reshape(x.shape)
