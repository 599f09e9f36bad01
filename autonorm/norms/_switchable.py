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

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, cast

import torch
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
    local_sum,
    records_stats,
    row_moments,
    sum_over_samples,
    token_norm_reference,
    traced_moments,
)
from autonorm.norms._sync import global_count, global_sum

#: Candidate statistics a SwitchableNorm may mix, per layout; all of them are the defaults
#: (the paper's channels-first IN/LN/BN; tokens LN/RMS/BN).
SWITCHABLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    CHANNELS_FIRST: ("instance", "layer", "batch"),
    CHANNELS_LAST: ("layer", "rms", "batch"),
}

#: How the mixing logits become weights: the paper's softmax, or Sparse SN's sparsestmax.
SWITCHABLE_MIXINGS = ("softmax", "sparsestmax")
#: A SwitchableNorm's mixing weights: ``{"mean" | "var": {candidate: weight}}``.
MixingWeights = dict[str, dict[str, float]]

_HALF_DTYPES = (torch.float16, torch.bfloat16)

#: A candidate's mean and (biased) variance.
_Moments = tuple[torch.Tensor, torch.Tensor]


def _check_mixing(mixing: str, radius: float) -> None:
    if mixing not in SWITCHABLE_MIXINGS:
        raise ValueError(f"`mixing` must be one of {SWITCHABLE_MIXINGS}, got {mixing!r}")
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius >= 0):
        raise ValueError(f"`radius` must be a finite number >= 0, got {radius!r}")
    if radius and mixing != "sparsestmax":
        raise ValueError(f"`radius` applies to mixing='sparsestmax', got mixing={mixing!r}")


class _BatchSource(NamedTuple):
    """Where one forward's batch statistics come from, fixed when the forward runs: the
    backward recomputes them as the forward did, even if the layer's mode has changed since.

    Attributes:
        kind: ``"input"`` (training, or eval without running statistics, as BatchNorm),
            ``"running"`` (eval with running statistics) or ``"none"`` (no batch branch).
        total: ``"input"``: the samples (channels-first) or tokens (channels-last) whose
            statistics pool, those of every process in training.
        mask: ``"input"``: the logit mask that drops the batch branch (a batch of one), or None.
        reduce: ``"input"``: the sum over processes (training) or the identity (eval).
    """

    kind: Literal["input", "running", "none"]
    total: int = 0
    mask: torch.Tensor | None = None
    reduce: Callable[[torch.Tensor], torch.Tensor] = local_sum

    def recorded(self, batch: _Moments | None) -> _Moments | None:
        """What a statistics function hands back for the running statistics: ``batch`` when
        it pools the input and the call is the forward's (see :func:`~autonorm.norms._switchable_ops.records_stats`)."""
        pooled = self.kind == "input" and self.mask is None
        return batch if pooled and records_stats() else None


def _mix_moments(
    candidates: Sequence[str],
    stats: Mapping[str, _Moments],
    mean_w: torch.Tensor,
    var_w: torch.Tensor,
    start: torch.Tensor | int = 0,
) -> _Moments:
    """``start + sum_k w_k stat_k``: the mixed mean (weights ``mean_w``) and variance (``var_w``)
    of the candidates in ``stats``, ``k`` being a candidate's index in ``candidates``.

    The sums run in ``candidates`` order, the means' first: the order of the ops fixes the order
    in which autograd adds up gradients, hence their last bits.
    """
    picked = [(k, stats[name]) for k, name in enumerate(candidates) if name in stats]
    mean = sum((mean_w[k] * m for k, (m, _) in picked), start)
    var = sum((var_w[k] * v for k, (_, v) in picked), start)
    return cast(torch.Tensor, mean), cast(torch.Tensor, var)


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

    @contextlib.contextmanager
    def only(self, candidate: str) -> Iterator[None]:
        """Compute with ``candidate`` alone (its weight exactly 1) inside the block, the learned
        logits (and a Sparse SN's radius) restored after it: per-slot evidence by perturbation.

        Raises:
            ValueError: ``candidate`` is not one of :attr:`candidates`.
        """
        if candidate not in self.candidates:
            raise ValueError(f"`candidate` must be one of {self.candidates}, got {candidate!r}")
        layer_state = (self.mean_weight, self.var_weight, self.radius)
        saved = [None if t is None else t.detach().clone() for t in layer_state]
        chosen = torch.tensor([c == candidate for c in self.candidates])
        with torch.no_grad():
            if self.radius is None:  # softmax of 0 and -inf: exactly one-hot
                logits = torch.where(chosen, 0.0, float("-inf"))
            else:  # sparsestmax at the vertex radius: the largest logit's vertex
                logits = chosen.to(torch.float64)
                self.radius.fill_(self.vertex_radius)
            self.mean_weight.copy_(logits)
            self.var_weight.copy_(logits)
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, value in zip(layer_state, saved, strict=True):
                    if tensor is not None and value is not None:
                        tensor.copy_(value)

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

    def mixing_weights(self) -> MixingWeights:
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
            stacklevel=4,  # SwitchableNorm.forward
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

    def _update_running(self, batch: _Moments, count: int) -> None:
        """Fold the input's batch mean and (biased) variance, C values each, over ``count``
        values per channel into the running statistics."""
        if count < 2 or not self.track_running_stats:
            return
        running_mean, running_var, tracked = self._running_stats()
        with torch.no_grad():
            mean, var = (stat.view(running_mean.shape) for stat in batch)
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

    def _batch_source(self, count: int, device: torch.device) -> _BatchSource:
        """Where this step's batch statistics come from (see :class:`_BatchSource`), for an
        input of ``count`` samples (channels-first) or tokens (channels-last) on ``device``."""
        if "batch" not in self.candidates:
            return _BatchSource("none")
        if not self.training and self.track_running_stats:
            return _BatchSource("running")
        if not self.training:  # eval statistics stay per process, as BatchNorm's
            return _BatchSource("input", count, self._branch_mask(count > 1))
        count = global_count(count, device)
        return _BatchSource("input", count, self._branch_mask(count > 1), global_sum)

    def _batch_stats(
        self,
        source: _BatchSource,
        mean: torch.Tensor,
        var: torch.Tensor,
        local_sum: Callable[[torch.Tensor], torch.Tensor],
    ) -> _Moments | None:
        """The batch candidate's mean and variance, shaped as ``local_sum``'s results.

        Args:
            source: where they come from.
            mean, var: the moments of groups of the input: per sample ``(N, C)``, or per
                channel ``(C,)`` over this process's tokens.
            local_sum: adds up a statistic of the groups here, weighted by their sizes.

        Returns:
            None without a batch branch; the running statistics; the input's, from the groups'
            by the law of total variance; or, where the batch branch is dropped, ``mean`` and
            ``var`` themselves: its weight is 0, so any finite stand-in does.
        """
        if source.kind == "none":
            return None
        if source.kind == "running":
            running_mean, running_var, _ = self._running_stats()
            shape = (1,) * (mean.dim() - 1) + (-1,)  # one group
            return running_mean.to(mean.dtype).view(shape), running_var.to(mean.dtype).view(shape)
        if source.mask is not None:
            return mean, var
        batch_mean = source.reduce(local_sum(mean)) / source.total
        batch_var = source.reduce(local_sum(var + (mean - batch_mean).square())) / source.total
        return batch_mean, batch_var

    def _params(
        self, dtype: torch.dtype, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The statistics functions' parameters: mixing logits (or weights), weight, bias."""
        return (
            *self._mixing_inputs(mask),
            None if self.weight is None else self.weight.to(dtype),
            None if self.bias is None else self.bias.to(dtype),
        )

    def _forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        if x3.shape[-1] == 0:
            raise ValueError(f"SwitchableNorm got an input with no positions: {tuple(x.shape)}")
        traced = tracing(x3)
        mean, var = traced_moments(x3, -1) if traced else instance_moments(x3.detach())
        source = self._batch_source(n, x.device)
        # x.dtype, not x: the function's saved tensors are the only references to the input
        affine_from_stats = functools.partial(self._per_channel_affine, source, x.dtype)
        params = self._params(x.dtype, source.mask)
        if traced:  # plain ops that the compiler fuses and differentiates itself
            (a, b), batch = affine_from_stats(mean, var, *params)
            out = torch.addcmul(b.unsqueeze(-1), x3, a.unsqueeze(-1))
        else:
            out, batch = PerChannelAffine.apply(x3, mean, var, affine_from_stats, *params)
        if batch is not None:
            self._update_running(batch, source.total * x3.shape[-1])
        return out.reshape(x.shape)

    def _per_channel_affine(
        self,
        source: _BatchSource,
        dtype: torch.dtype,
        mean: torch.Tensor,
        var: torch.Tensor,
        mean_logits: torch.Tensor,
        var_logits: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], _Moments | None]:
        """:class:`PerChannelAffine`'s function: ``(a, b)`` of ``y = x * a + b`` per (n, c) from
        the instance moments ``(N, C)``, and the batch statistics for the running ones."""
        stats: dict[str, _Moments] = {}
        if "instance" in self.candidates:
            stats["instance"] = (mean, var)
        if "layer" in self.candidates:
            layer_mean = mean.mean(1, keepdim=True)
            layer_var = (var + (mean - layer_mean).square()).mean(1, keepdim=True)
            stats["layer"] = (layer_mean, layer_var)
        batch = self._batch_stats(source, mean, var, sum_over_samples)
        if batch is not None:
            stats["batch"] = batch
        weights = self._mixed(mean_logits, source.mask), self._mixed(var_logits, source.mask)
        mixed_mean, mixed_var = _mix_moments(self.candidates, stats, *weights)
        a = torch.rsqrt(mixed_var + self.eps).expand(mean.shape)
        if weight is not None:
            a = a * weight
        b = -mixed_mean * a
        if bias is not None:
            b = b + bias
        return (a.to(dtype), b.to(dtype)), source.recorded(batch)

    def _forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.num_features)
        if flat.shape[0] == 0:
            raise ValueError(f"SwitchableNorm got an input with no tokens: {tuple(x.shape)}")
        traced = tracing(flat)
        source = self._batch_source(flat.shape[0], x.device)
        moments = self._token_moments(flat, source, traced)
        terms_from_stats = functools.partial(self._token_terms, source)
        params = self._params(x.dtype, source.mask)
        if traced:  # plain ops that the compiler fuses and differentiates itself
            terms, batch = terms_from_stats(*moments, *params)
            out = token_norm_reference(flat, terms, self.eps)
        else:
            out, batch = TokenNorm.apply(flat, *moments, terms_from_stats, self.eps, *params)
        if batch is not None:
            self._update_running(batch, source.total)
        return out.reshape(x.shape)

    def _token_moments(
        self, flat: torch.Tensor, source: _BatchSource, traced: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The moments of the rows (tokens) ``(M, 1)`` and of the columns (channels) ``(C,)`` of
        ``flat`` ``(M, C)``, or zeros where no candidate reads them."""
        if "layer" in self.candidates or "rms" in self.candidates:
            row_mean, row_var = traced_moments(flat, -1) if traced else row_moments(flat.detach())
        else:
            row_mean = row_var = flat.new_zeros(flat.shape[0], 1)
        if source.kind == "input":
            col_mean, col_var = traced_moments(flat, 0) if traced else column_moments(flat.detach())
        else:
            col_mean = col_var = flat.new_zeros(self.num_features)
        return row_mean, row_var, col_mean, col_var

    def _token_terms(
        self,
        source: _BatchSource,
        row_mean: torch.Tensor,
        row_var: torch.Tensor,
        col_mean: torch.Tensor,
        col_var: torch.Tensor,
        mean_logits: torch.Tensor,
        var_logits: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> tuple[tuple[torch.Tensor, ...], _Moments | None]:
        """:class:`TokenNorm`'s function: the mixed mean and variance as per-token (row) terms,
        from the layer and rms candidates, and per-channel (column) terms, from the batch one;
        the affine scale and shift; and the batch statistics for the running ones."""
        zeros_row, zeros_col = torch.zeros_like(row_mean), torch.zeros_like(col_mean)
        row_stats = {
            "layer": (row_mean, row_var),
            "rms": (zeros_row, row_var + row_mean.square()),  # mean of squares
        }
        token_sum = functools.partial(torch.mul, other=row_mean.shape[0])  # over tokens here
        batch = self._batch_stats(source, col_mean, col_var, token_sum)
        col_stats = {} if batch is None else {"batch": batch}
        weights = self._mixed(mean_logits, source.mask), self._mixed(var_logits, source.mask)
        row_terms = _mix_moments(self.candidates, row_stats, *weights, zeros_row)
        col_terms = _mix_moments(self.candidates, col_stats, *weights, zeros_col)
        scale = torch.ones_like(zeros_col) if weight is None else weight
        shift = zeros_col if bias is None else bias
        return (*row_terms, *col_terms, scale, shift), source.recorded(batch)
