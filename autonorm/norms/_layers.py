"""Normalization layers that torch lacks: layout variants of its native layers, DyT, identity.

Where torch has a layer (``nn.BatchNorm2d``, ``nn.GroupNorm``, ``nn.LayerNorm``, ``nn.RMSNorm``,
``nn.InstanceNorm*d``) the registry returns it. The classes here cover the rest: the other layout
of a native layer (e.g. a LayerNorm over C of an ``(N, C, H, W)`` tensor, as in ConvNeXt) and
layers that must accept any number of spatial dimensions. They subclass the native layer, so their
parameters, buffers and ``state_dict`` keys are the native ones and weights carry over by name.

Layouts: ``channels_first`` is ``(N, C, *)``; ``channels_last`` is ``(..., C)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from autonorm.norms._fast_ops import (
    DyTFunction,
    fused_dtype,
    group_norm_tokens,
    norm_over_channels,
    tracing,
)

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
LAYOUTS = (CHANNELS_FIRST, CHANNELS_LAST)


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _check_features(module: nn.Module, x: torch.Tensor, dim: int) -> None:
    num_features = module.num_features if hasattr(module, "num_features") else None
    if num_features is not None and x.shape[dim] != num_features:
        raise ValueError(
            f"{type(module).__name__} expects {num_features} channels at dim {dim}, "
            f"got input of shape {tuple(x.shape)}"
        )


def laid_out_like(out: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``out`` of a channels-first layer in the memory format BatchNorm gives for ``input``:
    channels-last memory where ``input`` is in it, else contiguous. A layer computing on a
    permuted view would otherwise hand back a strided tensor that a following ``.view``
    refuses."""
    for memory_format, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        in_format = input.dim() == ndim and input.is_contiguous(memory_format=memory_format)
        if in_format and not input.is_contiguous():
            return out.contiguous(memory_format=memory_format)
    return out.contiguous()


def add_affine(module: nn.Module, num_features: int, affine: bool, factory: dict[str, Any]) -> None:
    """Give ``module`` per-channel ``weight`` and ``bias`` parameters (set by
    :func:`reset_affine`), or register both as None when not ``affine``, as torch's norms do."""
    if affine:
        module.weight = nn.Parameter(torch.empty(num_features, **factory))
        module.bias = nn.Parameter(torch.empty(num_features, **factory))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


def reset_affine(module: nn.Module) -> None:
    """``weight`` to 1 and ``bias`` to 0, where :func:`add_affine` created them."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is not None:
        nn.init.ones_(weight)
    if bias is not None:
        nn.init.zeros_(bias)


class BatchNormNd(_BatchNorm):
    """``nn.BatchNorm{1,2,3}d`` for an input of any rank ``(N, C, *)``.

    Used where the input rank is not known when the layer is built; with a known rank the
    registry returns the native class.
    """

    layout = CHANNELS_FIRST

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, *), got {tuple(input.shape)}")


class BatchNormChannelsLast(_BatchNorm):
    """Batch normalization of a ``(..., C)`` input: per channel over every other position.

    For tokens ``(N, T, C)`` the statistics of channel c come from all N*T tokens.
    """

    layout = CHANNELS_LAST

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 2:
            raise ValueError(f"expected a flattened (M, C) input, got {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (..., C), got {tuple(input.shape)}")
        _check_features(self, input, -1)
        return super().forward(input.reshape(-1, input.shape[-1])).reshape(input.shape)


class GroupNormChannelsLast(nn.GroupNorm):
    """``nn.GroupNorm`` of a ``(N, ..., C)`` input: per sample over each group's channels and
    all positions. Takes ``num_features`` first like the other layers (``groups`` as keyword)."""

    layout = CHANNELS_LAST

    def __init__(
        self,
        num_features: int,
        groups: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(groups, num_features, eps=eps, affine=affine, device=device, dtype=dtype)

    @property
    def num_features(self) -> int:
        return self.num_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, ..., C), got {tuple(input.shape)}")
        if input.dim() > 2 and fused_dtype(input):  # no copies to and from channels first
            _check_features(self, input, -1)
            return group_norm_tokens(input, self.num_groups, self.weight, self.bias, self.eps)
        # contiguous as nn.LayerNorm returns it (GPT-2 views its norms' outputs)
        return super().forward(input.movedim(-1, 1)).movedim(1, -1).contiguous()


class InstanceNormNd(_InstanceNorm):
    """Instance normalization of ``(N, C, *)`` with at least one spatial position dimension,
    any rank. The native ``nn.InstanceNorm{1,2,3}d`` is used where the rank is known."""

    layout = CHANNELS_FIRST

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 3:
            raise ValueError(
                "instance normalization needs spatial positions: expected (N, C, L, ...), "
                f"got {tuple(input.shape)}"
            )

    def _get_no_batch_dim(self) -> int:
        return 0  # this layer always expects a batch dimension

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        _check_features(self, input, 1)
        return F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class InstanceNormChannelsLast(InstanceNormNd):
    """Instance normalization of ``(N, ..., C)``: per sample and channel over all positions
    (for tokens ``(N, T, C)``: over the T tokens)."""

    layout = CHANNELS_LAST

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 3:
            raise ValueError(
                "instance normalization needs positions: expected (N, L, ..., C), "
                f"got {tuple(input.shape)}"
            )
        # torch's kernel over channels first: the fused token path (group_norm_tokens with a
        # group per channel) lost precision on large-mean inputs with several threads
        # contiguous as nn.LayerNorm returns it (GPT-2 views its norms' outputs)
        return super().forward(input.movedim(-1, 1)).movedim(1, -1).contiguous()


class _OverChannelsAtEachPosition(nn.Module):
    """A norm over the last dim (``nn.LayerNorm``, ``nn.RMSNorm``) applied over C at each
    position of a ``(N, C, *)`` input. Mixed in before the native class, whose parameters,
    buffers and ``state_dict`` keys it keeps."""

    layout = CHANNELS_FIRST
    #: ``eps`` when none is given: the native class's default.
    default_eps: float | None = None
    normalized_shape: tuple[int, ...]

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps=self.default_eps if eps is None else eps,
            elementwise_affine=affine,
            device=device,
            dtype=dtype,
        )

    @property
    def num_features(self) -> int:
        return self.normalized_shape[0]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, *), got {tuple(input.shape)}")
        if fused_dtype(input):  # over dim 1 in place: no permuted copies
            _check_features(self, input, 1)
            eps = getattr(self, "eps", None)
            if eps is None:
                eps = torch.finfo(input.dtype).eps
            centered = isinstance(self, nn.LayerNorm)
            weight, bias = getattr(self, "weight", None), getattr(self, "bias", None)
            return norm_over_channels(input, weight, bias, 1, eps, centered)
        out: torch.Tensor = super().forward(input.movedim(1, -1))
        return laid_out_like(out.movedim(-1, 1), input)


class LayerNormChannelsFirst(_OverChannelsAtEachPosition, nn.LayerNorm):
    """LayerNorm over C at each position of a ``(N, C, *)`` input (ConvNeXt's LayerNorm2d).

    Normalizing over ``(C, H, W)`` per sample is ``groupnorm`` with ``groups=1`` instead.
    """

    default_eps = 1e-5


class RMSNormChannelsFirst(_OverChannelsAtEachPosition, nn.RMSNorm):
    """RMSNorm over C at each position of a ``(N, C, *)`` input (``eps=None``: the dtype's
    machine epsilon, as ``nn.RMSNorm``)."""


class FrozenBatchNorm(nn.Module):
    """Batch normalization with fixed statistics and affine, for fine-tuning a pretrained model.

    torchvision's ``FrozenBatchNorm2d`` (the detection backbones) for any rank and both layouts:
    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers (its ``state_dict``
    keys), so training changes nothing and every sample is normalized alone, in train mode too.

    Args:
        num_features: number of channels C.
        layout: ``"channels_first"`` for ``(N, C, *)`` or ``"channels_last"`` for ``(..., C)``.
        eps: added to the variance.
        affine: apply the frozen ``weight`` and ``bias``.

    Example::

        >>> layer = FrozenBatchNorm(8)
        >>> layer(torch.ones(2, 8, 3, 3)).shape, len(list(layer.parameters()))
        (torch.Size([2, 8, 3, 3]), 0)
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(
        self,
        num_features: int,
        *,
        layout: str = CHANNELS_FIRST,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.layout = check_layout(layout)
        self.eps = eps
        self.affine = affine
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        for name in ("weight", "bias") if affine else ():
            self.register_buffer(name, torch.empty(num_features, **factory))
        if not affine:
            self.register_buffer("weight", None)
            self.register_buffer("bias", None)
        self.register_buffer("running_mean", torch.empty(num_features, **factory))
        self.register_buffer("running_var", torch.empty(num_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)
        nn.init.zeros_(self.running_mean)
        nn.init.ones_(self.running_var)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm's state loads too
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        channel_dim = 1 if self.layout == CHANNELS_FIRST else -1
        _check_features(self, input, channel_dim)
        # torchvision's arithmetic, so that a rebuilt FrozenBatchNorm2d computes the same
        scale = (self.running_var + self.eps).rsqrt()
        if self.weight is not None:
            scale = self.weight * scale
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = self.bias + shift
        shape = [1] * input.dim()
        shape[channel_dim] = self.num_features
        return input * scale.view(shape) + shift.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, layout={self.layout!r}, eps={self.eps}, affine={self.affine}"


class DyT(nn.Module):
    """Dynamic Tanh: ``weight * tanh(alpha * x) + bias``, a normalization-free replacement.

    Zhu et al., "Transformers without Normalization", CVPR 2025. ``alpha`` is one learnable
    scalar; ``weight`` and ``bias`` are per channel.

    Args:
        num_features: number of channels C.
        layout: ``"channels_last"`` for ``(..., C)`` (the paper's use) or ``"channels_first"``
            for ``(N, C, *)``.
        alpha_init: initial value of alpha (0.5 in the paper).
        affine: learn per-channel ``weight`` and ``bias``.
        eps: accepted for a uniform interface; DyT has no variance to guard.

    Example::

        >>> layer = DyT(8)
        >>> layer(torch.zeros(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        *,
        layout: str = CHANNELS_LAST,
        alpha_init: float = 0.5,
        affine: bool = True,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(alpha_init, (int, float)) and math.isfinite(alpha_init)):
            raise ValueError(f"`alpha_init` must be a finite number, got {alpha_init!r}")
        self.num_features = num_features
        self.layout = check_layout(layout)
        self.alpha_init = float(alpha_init)
        self.affine = affine
        self.eps = eps
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.empty(1, **factory))
        add_affine(self, num_features, affine, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        reset_affine(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        channel_dim = 1 if self.layout == CHANNELS_FIRST else -1
        _check_features(self, input, channel_dim)
        if fused_dtype(input) and not tracing(input):
            weight, bias = (self.weight, self.bias) if self.affine else (None, None)
            return DyTFunction.apply(input, self.alpha, weight, bias, channel_dim)
        out = torch.tanh(self.alpha * input)
        if self.weight is not None and self.bias is not None:
            shape = [1] * input.dim()
            shape[channel_dim] = self.num_features
            out = torch.addcmul(self.bias.view(shape), out, self.weight.view(shape))
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, layout={self.layout!r}, alpha_init={self.alpha_init}, "
            f"affine={self.affine}"
        )


class IdentityNorm(nn.Identity):
    """No normalization: returns the input. Records ``num_features`` and ``layout`` so that it
    stays a slot that a later config can turn back into a norm."""

    def __init__(
        self,
        num_features: int,
        *,
        layout: str = CHANNELS_FIRST,
        **ignored: object,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.layout = check_layout(layout)

    def reset_parameters(self) -> None:
        """Nothing to reset: the layer has no parameters."""

    def extra_repr(self) -> str:
        return f"{self.num_features}, layout={self.layout!r}"
