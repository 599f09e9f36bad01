"""Which module classes are norm slots, and what each says of itself: its registry kind, default
layout, channel count, eps and the child modules run after its norm.

torch's norm classes, autonorm's own layers (a :class:`NormWithExtra` left by an earlier rewrite
included), classes registered with :func:`register_slot_type` and, read from their forward, library
norms (:mod:`autonorm.surgery._detect`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from autonorm.norms import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    BatchRenorm,
    DyT,
    EvoNormS0,
    FilterResponseNorm,
    FrozenBatchNorm,
    IdentityNorm,
    SwitchableNorm,
    SyncBatchNorm,
    check_layout,
    get_spec,
)
from autonorm.surgery._detect import read_library_norm
from autonorm.surgery._rebuild import NormWithExtra


@dataclass(frozen=True)
class SlotType:
    """How to read a registered norm class: its registry kind, layout, channel count, eps and
    weight offset."""

    cls: type[nn.Module]
    kind: str
    layout: str
    num_features: Callable[[nn.Module], int | None]
    extra: tuple[str, ...] | None = None
    eps: Callable[[nn.Module], float | None] = lambda m: getattr(m, "eps", None)
    weight_offset: float = 0.0


@dataclass(frozen=True)
class TypeInfo:
    """What a module's class (or, for a library norm, its forward) says of it as a slot."""

    kind: str
    layout: str
    num_features: int | None
    extra: tuple[str, ...] | None
    eps: float | None = None  # None: read ``.eps``
    weight_offset: float = 0.0
    ambiguous: bool = False  # a library norm reproduced under both layouts


_USER_TYPES: dict[type[nn.Module], SlotType] = {}


def _features_normalized_shape(module: nn.Module) -> int | None:
    shape = getattr(module, "normalized_shape", None)
    if shape is None:
        return None
    shape = tuple(shape)
    return shape[0] if len(shape) == 1 else None


def register_slot_type(
    cls: type[nn.Module],
    *,
    kind: str,
    layout: str = CHANNELS_FIRST,
    num_features: str | Callable[[nn.Module], int] = "num_features",
    extra: Sequence[str] | None = (),
    eps: str | Callable[[nn.Module], float] = "eps",
    weight_offset: float = 0.0,
) -> None:
    """Declare a norm class of your own as a slot type.

    Args:
        cls: the class (its subclasses are slots too).
        kind: the registry name closest to what it computes (``batchnorm``, ``layernorm``, ...):
            the slot's "keep" choice and the kind reported for it.
        layout: its default layout, when the probe cannot tell.
        num_features: attribute name or function giving the channel count.
        extra: names of child modules that run after the normalization (kept on rewrite); the
            rest of the class's forward is taken to be the normalization itself. None: let
            autonorm check, as for an unregistered subclass, that ``kind`` followed by the
            class's child modules reproduces its output, and refuse to rewrite it otherwise.
            A subclass that overrides ``forward`` again is always checked.
        eps: attribute name (``"variance_epsilon"``) or function giving the eps it uses.
        weight_offset: what its forward adds to its weight (1 for ``x * (1 + w)``, as Gemma's
            RMSNorm): a rewrite carries ``weight + weight_offset`` over.

    Example::

        >>> class MyNorm(nn.LayerNorm):
        ...     pass
        >>> register_slot_type(MyNorm, kind="layernorm", layout="channels_last",
        ...                    num_features=lambda m: m.normalized_shape[0])
    """
    get_spec(kind)
    check_layout(layout)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"`cls` must be an nn.Module subclass, got {cls!r}")
    if not isinstance(weight_offset, (int, float)) or isinstance(weight_offset, bool):
        raise ValueError(f"`weight_offset` must be a number, got {weight_offset!r}")
    reader = num_features if callable(num_features) else (lambda m, a=num_features: getattr(m, a))
    eps_reader = eps if callable(eps) else (lambda m, a=eps: getattr(m, a, None))
    _USER_TYPES[cls] = SlotType(
        cls,
        kind,
        layout,
        reader,
        None if extra is None else tuple(extra),
        eps_reader,
        float(weight_offset),
    )


#: autonorm's layers that keep their layout: their kinds (before torch's base classes, which
#: BatchRenorm subclasses).
_OWN_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (SwitchableNorm, "switchable"),
    (DyT, "dyt"),
    (IdentityNorm, "identity"),
    (BatchRenorm, "batchrenorm"),
    (FilterResponseNorm, "frn"),
    (EvoNormS0, "evonorm_s0"),
)


def _builtin_type(module: nn.Module) -> tuple[str, str, int | None] | None:
    """``(kind, default layout, num_features)`` of a module autonorm knows, else None."""
    layout = getattr(module, "layout", None)
    for cls, kind in _OWN_KINDS:
        if isinstance(module, cls):
            own: Any = module  # each of them keeps its layout and channel count
            return kind, own.layout, own.num_features
    if isinstance(module, FrozenBatchNorm):
        return "frozenbatchnorm", module.layout, module.num_features
    if isinstance(module, (nn.SyncBatchNorm, SyncBatchNorm)):
        return "syncbatchnorm", layout or CHANNELS_FIRST, module.num_features
    if isinstance(module, _BatchNorm):
        return "batchnorm", layout or CHANNELS_FIRST, module.num_features
    if isinstance(module, _InstanceNorm):
        return "instancenorm", layout or CHANNELS_FIRST, module.num_features
    if isinstance(module, nn.GroupNorm):
        return "groupnorm", layout or CHANNELS_FIRST, module.num_channels
    if isinstance(module, nn.LayerNorm):
        return "layernorm", layout or CHANNELS_LAST, _features_normalized_shape(module)
    if isinstance(module, nn.RMSNorm):
        return "rmsnorm", layout or CHANNELS_LAST, _features_normalized_shape(module)
    return None


def class_reading(module: nn.Module) -> TypeInfo | None:
    """What the module's class says of it as a slot: registered, autonorm's or torch's."""
    if isinstance(module, NormWithExtra):
        inner = class_reading(module.norm)
        return None if inner is None else replace(inner, extra=module.extra_names)
    for cls in type(module).__mro__:
        if cls in _USER_TYPES:
            entry = _USER_TYPES[cls]
            # the declaration covers the registered class's forward, not a subclass's override
            extra = entry.extra if type(module).forward is cls.forward else None
            eps = entry.eps(module)
            return TypeInfo(
                entry.kind,
                entry.layout,
                entry.num_features(module),
                extra,
                None if eps is None else float(eps),
                entry.weight_offset,
            )
    found = _builtin_type(module)
    return None if found is None else TypeInfo(*found, None)


def library_reading(module: nn.Module) -> TypeInfo | None:
    """A library norm read from its forward (:mod:`autonorm.surgery._detect`): nothing of
    it runs after the norm."""
    reading = read_library_norm(module)
    if reading is None:
        return None
    return TypeInfo(
        reading.kind,
        reading.layout,
        reading.num_features,
        (),
        reading.eps,
        reading.weight_offset,
        reading.ambiguous,
    )
