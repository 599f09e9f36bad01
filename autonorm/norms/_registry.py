"""One registry of normalization choices: ``create_norm(name, num_features, ...)``.

Each entry knows how to build its layer for a layout and input rank, which parameters it takes,
and what must hold for a slot (:func:`check_choice`), so that surgery, search spaces and the
callback validate choices the same way.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from autonorm.norms._groups import default_groups
from autonorm.norms._layers import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    LAYOUTS,
    BatchNormChannelsLast,
    BatchNormNd,
    DyT,
    FrozenBatchNorm,
    GroupNormChannelsLast,
    IdentityNorm,
    InstanceNormChannelsLast,
    InstanceNormNd,
    LayerNormChannelsFirst,
    RMSNormChannelsFirst,
    check_layout,
)
from autonorm.norms._small_batch import BatchRenorm, EvoNormS0, FilterResponseNorm
from autonorm.norms._switchable import SwitchableNorm
from autonorm.norms._sync import SyncBatchNorm
from autonorm.norms._weight import check_weight

_BATCHNORM_BY_NDIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_INSTANCENORM_BY_NDIM = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}
#: Keyword arguments every registry layer takes.
COMMON_PARAMS = ("eps", "affine", "device", "dtype")


def _batchnorm(
    num_features: int,
    *,
    layout: str,
    input_ndim: int | None,
    momentum: float | None = 0.1,
    **kw: Any,
) -> nn.Module:
    if layout == CHANNELS_LAST:
        return BatchNormChannelsLast(num_features, momentum=momentum, **kw)
    cls = _BATCHNORM_BY_NDIM.get(input_ndim, BatchNormNd)  # type: ignore[arg-type]
    return cls(num_features, momentum=momentum, **kw)


def _syncbatchnorm(
    num_features: int,
    *,
    layout: str,
    input_ndim: int | None,
    momentum: float | None = 0.1,
    **kw: Any,
) -> nn.Module:
    return SyncBatchNorm(num_features, momentum=momentum, layout=layout, **kw)


def _frozenbatchnorm(
    num_features: int, *, layout: str, input_ndim: int | None, **kw: Any
) -> nn.Module:
    return FrozenBatchNorm(num_features, layout=layout, **kw)


def _groupnorm(
    num_features: int, *, layout: str, input_ndim: int | None, groups: int | None = None, **kw: Any
) -> nn.Module:
    if groups is None:
        groups = default_groups(num_features, input_ndim=input_ndim)
    if layout == CHANNELS_LAST:
        return GroupNormChannelsLast(num_features, groups, **kw)
    return nn.GroupNorm(groups, num_features, **kw)


def _instancenorm(
    num_features: int,
    *,
    layout: str,
    input_ndim: int | None,
    track_running_stats: bool = False,
    momentum: float | None = 0.1,
    affine: bool = True,
    **kw: Any,
) -> nn.Module:
    if track_running_stats and momentum is None:
        # batch norms read None as a cumulative average; torch's instance_norm reads it as 0
        raise ValueError(
            "instancenorm: momentum=None with track_running_stats=True never updates the "
            "running statistics (torch's instance norm reads None as 0); give a momentum in (0, 1]"
        )
    kw.update(affine=affine, track_running_stats=track_running_stats, momentum=momentum)
    if layout == CHANNELS_LAST:
        return InstanceNormChannelsLast(num_features, **kw)
    cls = _INSTANCENORM_BY_NDIM.get(input_ndim, InstanceNormNd)  # type: ignore[arg-type]
    return cls(num_features, **kw)


def _layernorm(
    num_features: int, *, layout: str, input_ndim: int | None, affine: bool = True, **kw: Any
) -> nn.Module:
    if layout == CHANNELS_FIRST:
        return LayerNormChannelsFirst(num_features, affine=affine, **kw)
    return nn.LayerNorm(num_features, elementwise_affine=affine, **kw)


def _rmsnorm(
    num_features: int, *, layout: str, input_ndim: int | None, affine: bool = True, **kw: Any
) -> nn.Module:
    if layout == CHANNELS_FIRST:
        return RMSNormChannelsFirst(num_features, affine=affine, **kw)
    return nn.RMSNorm(num_features, elementwise_affine=affine, **kw)


def _switchable(num_features: int, *, layout: str, input_ndim: int | None, **kw: Any) -> nn.Module:
    return SwitchableNorm(num_features, layout=layout, **kw)


def _dyt(num_features: int, *, layout: str, input_ndim: int | None, **kw: Any) -> nn.Module:
    return DyT(num_features, layout=layout, **kw)


def _batchrenorm(num_features: int, *, layout: str, input_ndim: int | None, **kw: Any) -> nn.Module:
    return BatchRenorm(num_features, layout=layout, **kw)


def _frn(num_features: int, *, layout: str, input_ndim: int | None, **kw: Any) -> nn.Module:
    return FilterResponseNorm(num_features, layout=layout, **kw)


def _evonorm_s0(
    num_features: int, *, layout: str, input_ndim: int | None, groups: int | None = None, **kw: Any
) -> nn.Module:
    if groups is None:
        groups = default_groups(num_features, input_ndim=input_ndim)
    return EvoNormS0(num_features, groups, layout=layout, **kw)


def _identity(num_features: int, *, layout: str, input_ndim: int | None, **kw: Any) -> nn.Module:
    return IdentityNorm(num_features, layout=layout)


@dataclass(frozen=True)
class NormSpec:
    """What the registry knows of one choice.

    Attributes:
        name: registry name.
        build: ``build(num_features, *, layout, input_ndim, **params)``.
        params: keyword parameters the choice accepts besides eps/affine/device/dtype.
        needs_positions: the statistics need more than one position per (sample, channel):
            invalid on an ``(N, C)`` input.
        reference: the paper or source, for docs and reports.
        activation: the layer includes its activation (FRN's TLU, EvoNorm's sigmoid gate): it
            replaces the slot's norm and the activation after it, so the slot must know one.
    """

    name: str
    build: Callable[..., nn.Module]
    params: tuple[str, ...] = ()
    needs_positions: bool = False
    reference: str = ""
    layouts: tuple[str, ...] = field(default=LAYOUTS)
    activation: bool = False


#: Batch Renormalization's parameters besides eps/affine: its momentum, the limits of its
#: corrections and their schedule.
RENORM_PARAMS = ("momentum", "r_max", "d_max", "warmup_steps", "ramp_steps")

_REGISTRY: dict[str, NormSpec] = {
    spec.name: spec
    for spec in (
        NormSpec(
            "batchnorm",
            _batchnorm,
            ("momentum", "track_running_stats"),
            reference="Ioffe & Szegedy, Batch Normalization, ICML 2015",
        ),
        NormSpec(
            "syncbatchnorm",
            _syncbatchnorm,
            ("momentum", "track_running_stats"),
            reference="Zhang et al., Context Encoding for Semantic Segmentation, CVPR 2018 "
            "(cross-GPU batch norm); Peng et al., MegDet, CVPR 2018",
        ),
        NormSpec(
            "frozenbatchnorm",
            _frozenbatchnorm,
            reference="torchvision FrozenBatchNorm2d: batch norm with fixed statistics and "
            "affine, for fine-tuning",
        ),
        NormSpec(
            "groupnorm",
            _groupnorm,
            ("groups",),
            reference="Wu & He, Group Normalization, ECCV 2018",
        ),
        NormSpec(
            "instancenorm",
            _instancenorm,
            ("momentum", "track_running_stats"),
            needs_positions=True,
            reference="Ulyanov et al., Instance Normalization, 2016",
        ),
        NormSpec("layernorm", _layernorm, reference="Ba et al., Layer Normalization, 2016"),
        NormSpec(
            "rmsnorm",
            _rmsnorm,
            reference="Zhang & Sennrich, Root Mean Square Layer Normalization, NeurIPS 2019",
        ),
        NormSpec(
            "switchable",
            _switchable,
            ("candidates", "momentum", "mixing", "track_running_stats"),
            reference="Luo et al., Switchable Normalization, ICLR 2019",
        ),
        NormSpec(
            "dyt",
            _dyt,
            ("alpha_init",),
            reference="Zhu et al., Transformers without Normalization, CVPR 2025",
        ),
        NormSpec(
            "batchrenorm",
            _batchrenorm,
            RENORM_PARAMS,
            reference="Ioffe, Batch Renormalization, NeurIPS 2017",
        ),
        NormSpec(
            "frn",
            _frn,
            needs_positions=True,
            reference="Singh & Krishnan, Filter Response Normalization Layer (FRN + TLU), "
            "CVPR 2020",
            activation=True,
        ),
        NormSpec(
            "evonorm_s0",
            _evonorm_s0,
            ("groups",),
            reference="Liu et al., Evolving Normalization-Activation Layers (EvoNorm-S0), "
            "NeurIPS 2020",
            activation=True,
        ),
        NormSpec("identity", _identity, reference="no normalization"),
    )
}

#: Registry names, in a stable order.
NORM_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_spec(name: str) -> NormSpec:
    """The :class:`NormSpec` of a registry name.

    Raises:
        ValueError: unknown name (the message lists the valid names).
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown norm {name!r}; valid names are: {', '.join(NORM_NAMES)}"
        ) from None


def check_choice(
    name: str,
    num_features: int,
    *,
    layout: str = CHANNELS_FIRST,
    input_shape: tuple[int, ...] | None = None,
    weight: str | None = None,
    **params: Any,
) -> list[str]:
    """Everything that keeps a choice from working on a slot, as messages (empty: valid).

    Args:
        name: registry name.
        num_features: the slot's channel count.
        layout: the slot's layout.
        input_shape: the slot's input shape from the probe, if known.
        weight: the choice's weight-side part (``"ws"``, ``"wn"`` or None); whether the slot
            has a layer feeding it is checked with the slot (:meth:`autonorm.Slot.check`).
        **params: the choice's parameters (e.g. ``groups``).

    Example::

        >>> check_choice("groupnorm", 8, groups=3)
        ['`groups` must divide num_features, got groups=3, num_features=8']
    """
    try:
        spec = get_spec(name)
    except ValueError as err:
        return [str(err)]
    problems = check_weight(weight)
    if layout not in spec.layouts:
        problems.append(f"{name} does not support layout {layout!r}")
    allowed = set(spec.params) | set(COMMON_PARAMS)
    unknown = sorted(set(params) - allowed)
    if unknown:
        problems.append(f"{name} takes parameters {sorted(allowed)}, got unknown {unknown}")
    value_problems = check_params(params)
    problems += value_problems
    groups = params.get("groups")
    if name in GROUPED and groups is not None and not value_problems and num_features % groups:
        problems.append(
            f"`groups` must divide num_features, got groups={groups}, num_features={num_features}"
        )
    if spec.needs_positions and input_shape is not None:
        positions = _positions(input_shape, layout)
        if positions <= 1:
            problems.append(
                f"{name} needs more than one position per sample and channel; the input "
                f"{tuple(input_shape)} ({layout}) has {positions}"
            )
    return problems


#: Choices that take a group count, which must divide the channels.
GROUPED = ("groupnorm", "evonorm_s0")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_params(params: dict[str, Any]) -> list[str]:
    """What is wrong with the values of a choice's parameters, whatever the slot (empty: all
    valid): ``eps`` a finite number > 0; ``momentum`` a number in [0, 1] or None;
    ``affine``/``track_running_stats`` true or false (not a string); ``groups`` a positive
    int or None; ``alpha_init`` a finite number; ``r_max`` a finite number >= 1, ``d_max`` one
    >= 0; ``warmup_steps`` an int >= 0 and ``ramp_steps`` one >= 1.

    Example::

        >>> check_params({"eps": float("inf"), "affine": "false"})
        ['`eps` must be a finite number > 0, got eps=inf', "`affine` must be true or false, got affine='false'"]
    """
    problems = []
    for key, value in params.items():
        if key == "eps" and not (_is_number(value) and math.isfinite(value) and value > 0):
            problems.append(f"`eps` must be a finite number > 0, got eps={value!r}")
        elif (
            key == "momentum" and value is not None and not (_is_number(value) and 0 <= value <= 1)
        ):
            problems.append(
                f"`momentum` must be a number in [0, 1] or None, got momentum={value!r}"
            )
        elif key in ("affine", "track_running_stats") and not isinstance(value, bool):
            problems.append(f"`{key}` must be true or false, got {key}={value!r}")
        elif (
            key == "groups"
            and value is not None
            and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        ):
            problems.append(f"`groups` must be a positive int, got groups={value!r}")
        elif key == "alpha_init" and not (_is_number(value) and math.isfinite(value)):
            problems.append(f"`alpha_init` must be a finite number, got alpha_init={value!r}")
        elif key in _LOWEST and not _at_least(value, _LOWEST[key], integer=key.endswith("steps")):
            kind = "an int" if key.endswith("steps") else "a finite number"
            problems.append(f"`{key}` must be {kind} >= {_LOWEST[key]}, got {key}={value!r}")
    return problems


#: The least value of Batch Renormalization's parameters.
_LOWEST = {"r_max": 1, "d_max": 0, "warmup_steps": 0, "ramp_steps": 1}


def _at_least(value: Any, lowest: int, *, integer: bool) -> bool:
    if integer and not (isinstance(value, int) and not isinstance(value, bool)):
        return False
    return _is_number(value) and math.isfinite(value) and value >= lowest


def _positions(input_shape: tuple[int, ...], layout: str) -> int:
    """Positions per (sample, channel): the product of the non-batch, non-channel dims."""
    dims = input_shape[2:] if layout == CHANNELS_FIRST else input_shape[1:-1]
    count = 1
    for d in dims:
        count *= d
    return count


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return False
    return name in signature.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )


def create_norm(
    name: str | type[nn.Module] | functools.partial[nn.Module] | Callable[..., nn.Module],
    num_features: int,
    *,
    layout: str = CHANNELS_FIRST,
    input_ndim: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a normalization layer.

    Args:
        name: a registry name (``batchnorm``, ``syncbatchnorm``, ``frozenbatchnorm``,
            ``groupnorm``, ``instancenorm``, ``layernorm``, ``rmsnorm``, ``switchable``, ``dyt``,
            ``batchrenorm``, ``frn``, ``evonorm_s0``, ``identity``), or a class / partial / factory
            called as ``factory(num_features, **kwargs)`` (with ``layout`` if it accepts one).
        num_features: number of channels C.
        layout: ``"channels_first"`` (input ``(N, C, *)``) or ``"channels_last"`` (``(..., C)``).
        input_ndim: rank of the input, when known: picks the native ``nn.BatchNorm{1,2,3}d`` /
            ``nn.InstanceNorm{1,2,3}d``; without it a rank-agnostic subclass is built.
        **kwargs: ``eps``, ``affine``, ``device``, ``dtype`` and the choice's own parameters
            (``groups`` for groupnorm, by default :func:`~autonorm.norms._groups.default_groups`
            of the channels and ``input_ndim``; ``candidates`` for switchable, the statistics it
            mixes; ``alpha_init`` for dyt; :data:`RENORM_PARAMS` for batchrenorm; ``groups``
            for evonorm_s0, defaulting as groupnorm's).

    Returns:
        The layer.

    Raises:
        ValueError: unknown name (listing the valid names) or invalid parameters (saying what
            must hold and what was given).

    Example::

        >>> gn = create_norm("groupnorm", 64, groups=8)
        >>> type(gn).__name__, gn.num_groups, gn.num_channels
        ('GroupNorm', 8, 64)
        >>> create_norm("layernorm", 64, layout="channels_last").normalized_shape
        (64,)
    """
    layout = check_layout(layout)
    if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
        raise ValueError(f"`num_features` must be a positive int, got {num_features!r}")
    if not isinstance(name, str):
        if not callable(name):
            raise ValueError(f"`name` must be a registry name, a class or a factory, got {name!r}")
        if _accepts(name, "layout"):
            kwargs["layout"] = layout
        return name(num_features, **kwargs)
    if "weight" in kwargs:
        raise ValueError(
            "`weight` (ws/wn) acts on the layer feeding a slot, not on the norm layer: give it "
            "in a NormChoice and apply it with autonorm.apply_config"
        )
    problems = check_choice(name, num_features, layout=layout, **kwargs)
    if problems:
        raise ValueError("; ".join(problems))
    return get_spec(name).build(num_features, layout=layout, input_ndim=input_ndim, **kwargs)
