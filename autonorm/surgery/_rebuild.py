"""Rebuilding one slot's layer: the replacement a choice builds, with weights carried over.

Affine weights, BatchNorm running statistics, device, dtype, train/eval mode and
``requires_grad`` carry over; a fused subclass keeps its extra steps (:class:`NormWithExtra`).
:func:`keep_choice_of` is the other direction: the choice that rebuilds a layer as it is.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from autonorm.config import NormChoice
from autonorm.norms import SWITCHABLE_CANDIDATES, create_norm, get_spec

log = logging.getLogger(__name__)


class NormWithExtra(nn.Module):
    """A norm followed by the extra steps of the subclass it replaced (activation, drop path).

    Model zoos fuse steps into norm subclasses (``BatchNormAct2d``: batch norm, then ``act``
    and ``drop`` children). When such a slot gets another norm, the new norm runs first and
    the original child modules after it, under their original names.

    Args:
        norm: the normalization layer.
        extra: ``(name, module)`` pairs run in order after ``norm``.
    """

    def __init__(self, norm: nn.Module, extra: Sequence[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.norm = norm
        self.extra_names = tuple(name for name, _ in extra)
        for name, module in extra:
            self.add_module(name, module)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self.norm(input)
        for name in self.extra_names:
            out = getattr(self, name)(out)
        return out

    def extra_repr(self) -> str:
        return f"extra={self.extra_names}"


def inner(module: nn.Module) -> nn.Module:
    """The norm of a :class:`NormWithExtra`, else the module itself."""
    return module.norm if isinstance(module, NormWithExtra) else module


def factory_of(module: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` of the module's tensors (empty when it has none)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return {"device": tensor.device}
    return {}


def _has_running_stats(module: nn.Module) -> bool:
    """Whether the module keeps batch statistics (a BatchNorm, SwitchableNorm or frozen batch
    norm, torchvision's included; instance norms' running averages are another statistic)."""
    return (
        not isinstance(module, _InstanceNorm)
        and isinstance(getattr(module, "running_mean", None), torch.Tensor)
        and isinstance(getattr(module, "running_var", None), torch.Tensor)
    )


def _carry(
    old: nn.Module, new: nn.Module, dropped: list[str], slot_name: str, weight_offset: float = 0.0
) -> None:
    """Copy affine weights (``weight_offset`` added to the weight: Gemma's ``1 + w``) and
    running statistics between batch-statistics layers. Affine values kept as buffers (a
    frozen batch norm) become trainable parameters of a layer that has them as parameters."""
    with torch.no_grad():
        for attr in ("weight", "bias"):
            source = getattr(old, attr, None)
            if not isinstance(source, torch.Tensor):
                continue
            target = getattr(new, attr, None)
            if isinstance(target, torch.Tensor) and target.shape == source.shape:
                target.copy_(source + weight_offset if attr == "weight" else source)
                if isinstance(source, nn.Parameter) and isinstance(target, nn.Parameter):
                    target.requires_grad_(source.requires_grad)
            else:
                dropped.append(f"{slot_name}.{attr}")
        if _has_running_stats(old) and _has_running_stats(new):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                source, target = getattr(old, name, None), getattr(new, name, None)
                if isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor):
                    target.copy_(source)
    if not any(p.requires_grad for p in old.parameters()) and any(True for _ in old.parameters()):
        for parameter in new.parameters():
            parameter.requires_grad_(False)  # a frozen slot stays frozen


def _num_features(module: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    norm: Any = module  # a LayerNorm/RMSNorm-like layer: its normalized_shape is a tuple
    return int(tuple(norm.normalized_shape)[0])


def build_replacement(
    module: nn.Module,
    choice: NormChoice,
    *,
    layout: str,
    input_ndim: int | None,
    extra: Sequence[str] | None,
    dropped: list[str] | None = None,
    slot_name: str = "",
    default_factory: Mapping[str, Any] | None = None,
    num_features: int | None = None,
    weight_offset: float = 0.0,
) -> nn.Module:
    """The layer ``choice`` builds for the slot holding ``module``, weights carried over.

    Args:
        module: the layer now in the slot.
        choice: the new choice.
        layout: the slot's layout.
        input_ndim: the slot's input rank, when known.
        extra: names of ``module``'s children that run after the norm (kept after the new norm).
        dropped: collects the parameters the new layer has no place for.
        slot_name: for messages.
        default_factory: ``device``/``dtype`` for a layer built in place of one that has no
            tensors to take them from (identity, a norm without affine parameters).
        num_features: the slot's channel count (default: read from ``module``'s attributes;
            a slot type registered with its own reader passes it).
        weight_offset: added to ``module``'s weight to get the new layer's (1 for a norm
            computing ``x * (1 + w)``, as Gemma's).
    """
    old = inner(module)
    factory = {**(default_factory or {}), **factory_of(old)}
    new = create_norm(
        choice.name,
        _num_features(old) if num_features is None else num_features,
        layout=layout,
        input_ndim=input_ndim,
        **factory,
        **choice.params,
    )
    _carry(old, new, dropped if dropped is not None else [], slot_name, weight_offset)
    new.train(module.training)
    if extra:
        new = NormWithExtra(new, [(name, getattr(module, name)) for name in extra])
        new.train(module.training)
    return new


def reproduces(
    module: nn.Module,
    num_features: int,
    keep: NormChoice,
    layout: str,
    x: torch.Tensor,
    y: torch.Tensor,
    extra: tuple[str, ...],
    weight_offset: float = 0.0,
) -> bool:
    """Whether the keep choice (rebuilt with the module's weights, ``weight_offset`` added to
    its weight) then ``extra`` maps ``x`` to ``y``, the module's own output."""
    try:
        rebuilt = build_replacement(
            module,
            keep,
            layout=layout,
            input_ndim=x.dim(),
            extra=None,
            num_features=num_features,
            weight_offset=weight_offset,
        )
        rebuilt.eval()
        with torch.no_grad():
            out = rebuilt(x)
            for name in extra:
                out = getattr(module, name)(out)
    except Exception as err:  # a rebuild that cannot even run does not reproduce it
        log.debug("rebuilding %s as %s failed: %s", type(module).__name__, keep.label, err)
        return False
    low_precision = y.dtype in (torch.float16, torch.bfloat16)
    rtol, atol = (1e-2, 1e-3) if low_precision else (1e-4, 1e-5)
    return out.shape == y.shape and torch.allclose(out, y, rtol=rtol, atol=atol)


def _affine(norm: nn.Module, kind: str) -> bool:
    if kind in ("layernorm", "rmsnorm"):
        return bool(getattr(norm, "elementwise_affine", True))
    return bool(getattr(norm, "affine", True))


#: eps of a registry layer built without one (nn.RMSNorm's None: the dtype's machine epsilon).
_DEFAULT_EPS: dict[str, float | None] = {"rmsnorm": None, "frn": 1e-6}
#: Kinds whose settings (momentum, affine, tracking) mean the same: a rewrite among them keeps
#: them. SwitchableNorm keeps batch statistics with a momentum, so it carries them through the
#: learned path (BatchNorm -> SwitchableNorm -> BatchNorm).
BATCH_FAMILY = frozenset(
    {"batchnorm", "syncbatchnorm", "frozenbatchnorm", "switchable", "batchrenorm"}
)


def _renorm_params(norm: Any) -> dict[str, Any]:
    """A Batch Renormalization layer's limits and given schedule, where not the defaults."""
    params: dict[str, Any] = {}
    if norm.r_max != 3.0:
        params["r_max"] = norm.r_max
    if norm.d_max != 5.0:
        params["d_max"] = norm.d_max
    if norm.given_schedule:
        params.update(warmup_steps=norm.warmup_steps, ramp_steps=norm.ramp_steps)
    return params


def keep_choice_of(module: nn.Module, kind: str, *, eps: float | None = None) -> NormChoice:
    """The registry choice that rebuilds ``module`` as it is (non-default settings included).

    Args:
        module: the layer.
        kind: its registry kind.
        eps: its eps, where it keeps it under another name than ``eps`` (default: ``.eps``).
    """
    norm: Any = inner(module)  # read duck-typed: the attributes of each kind's layers
    params: dict[str, Any] = {}
    if eps is None:
        eps = getattr(norm, "eps", None)
    if kind == "groupnorm":
        params["groups"] = norm.num_groups
    if kind == "evonorm_s0":
        params["groups"] = norm.groups
    if kind == "batchrenorm":
        params.update(_renorm_params(norm))
    if kind == "switchable":
        if norm.candidates != SWITCHABLE_CANDIDATES[norm.layout]:
            params["candidates"] = list(norm.candidates)
        if getattr(norm, "mixing", "softmax") != "softmax":  # Sparse SN rebuilds as Sparse SN
            params["mixing"] = norm.mixing
        if norm.momentum != 0.1:
            params["momentum"] = norm.momentum
        if not norm.track_running_stats:
            params["track_running_stats"] = False
    if kind == "dyt" and norm.alpha_init != 0.5:
        params["alpha_init"] = norm.alpha_init
    if kind in ("batchnorm", "syncbatchnorm", "instancenorm", "batchrenorm"):
        if norm.momentum != 0.1:
            params["momentum"] = norm.momentum
        default_tracking = kind != "instancenorm"
        if norm.track_running_stats != default_tracking:
            params["track_running_stats"] = norm.track_running_stats
    if not _affine(norm, kind):
        params["affine"] = False
    if kind not in ("identity", "dyt") and eps is not None and eps != _DEFAULT_EPS.get(kind, 1e-5):
        params["eps"] = float(eps)
    return NormChoice(kind, params)


def settled_choice(choice: NormChoice, current: NormChoice) -> NormChoice:
    """``choice`` with the settings of the slot's layer it does not set itself.

    A rewrite within a family (the same kind; batch norms among themselves) keeps the layer's
    eps, momentum, affine, tracking and group count; across families a non-default eps stays.
    The choice's own parameters win.

    Args:
        choice: the new choice.
        current: the keep choice of the layer in the slot (:func:`keep_choice_of`).

    Example::

        >>> settled_choice(NormChoice("groupnorm"), NormChoice("groupnorm", {"groups": 8})).label
        'groupnorm(groups=8)'
        >>> current = NormChoice("batchnorm", {"eps": 0.001, "momentum": 0.01})
        >>> settled_choice(NormChoice("layernorm"), current).label
        'layernorm(eps=0.001)'
    """
    same = choice.name == current.name or {choice.name, current.name} <= BATCH_FAMILY
    accepted = set(get_spec(choice.name).params) | {"eps", "affine"}
    carried = {k: v for k, v in current.params.items() if k in accepted and (same or k == "eps")}
    if not carried.keys() - choice.params.keys():
        return choice
    return NormChoice(choice.name, {**carried, **choice.params}, choice.weight)
