"""Weight-side normalization of the layer that feeds a norm slot.

Two choices act on the weight of the Conv/Linear layer whose output a norm slot normalizes,
as ``torch.nn.utils.parametrize`` parametrizations (the weight stays a plain attribute, the
learned tensors live under ``parametrizations.weight``):

- ``ws``, Weight Standardization (Qiao et al. 2019): each output filter's weights are
  standardized to zero mean and unit (biased) variance before the layer uses them.
- ``wn``, Weight Normalization (Salimans & Kingma 2016): ``w = g * v / ||v||`` per output
  filter, through ``torch.nn.utils.parametrizations.weight_norm``; ``g`` starts at ``||w||``,
  so the layer computes what it computed before.

The output filters are dim 0 of a Conv/Linear weight and dim 1 of a ConvTranspose weight
(``(in, out, *kernel)``); a grouped ConvTranspose mixes groups along dim 1 and is not a feeder.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm, weight_norm

#: Weight-side choice -> reference.
WEIGHT_NORMS: dict[str, str] = {
    "ws": "Qiao et al., Micro-Batch Training with Batch-Channel Normalization and Weight "
    "Standardization, 2019",
    "wn": "Salimans & Kingma, Weight Normalization, NeurIPS 2016",
}
#: Weight-side choice names, in a stable order.
WEIGHT_NAMES: tuple[str, ...] = tuple(WEIGHT_NORMS)
_TITLES = {"ws": "weight standardization", "wn": "weight normalization"}

#: Layer types whose weight a weight-side choice can normalize.
FEEDER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
#: Attribute set on the parametrizations autonorm adds: the slot the feeder was given for.
SLOT_TAG = "autonorm_slot"
#: Attribute set on the parametrizations autonorm adds: the feeder's own name then.
FEEDER_TAG = "autonorm_feeder"


def check_weight(weight: str | None) -> list[str]:
    """Problems of a weight-side choice name (empty: valid; None means no weight part)."""
    if weight is None or weight in WEIGHT_NORMS:
        return []
    valid = ", ".join(f"{k} ({_TITLES[k]})" for k in WEIGHT_NAMES)
    return [f"unknown weight normalization {weight!r}; valid: {valid}"]


class WeightStandardization(nn.Module):
    """Parametrization standardizing each output filter of a weight (Qiao et al. 2019).

    ``w_hat[o] = (w[o] - mean(w[o])) / sqrt(var(w[o]) + eps)``, the mean and biased variance
    taken over every dim but ``dim``. Register it with
    ``torch.nn.utils.parametrize.register_parametrization(conv, "weight", ...)``, or through
    :func:`set_weight_norm`.

    Args:
        dim: the dim of the output filters (0 for Conv/Linear, 1 for ConvTranspose).
        eps: added to the variance.

    Example::

        >>> conv = nn.Conv2d(3, 4, 3)
        >>> _ = parametrize.register_parametrization(conv, "weight", WeightStandardization())
        >>> w = conv.weight.flatten(1)
        >>> # the variance is var / (var + eps): just under 1 for the small initial weights
        >>> bool(w.mean(1).abs().max() < 1e-6), bool((w.var(1, correction=0) - 1).abs().max() < 1e-2)
        (True, True)
    """

    def __init__(self, dim: int = 0, eps: float = 1e-5) -> None:
        super().__init__()
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"`eps` must be > 0, got eps={eps!r}")
        self.dim = dim
        self.eps = float(eps)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(weight.dim()) if d != self.dim % weight.dim()]
        w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
        var, mean = torch.var_mean(w, dim=dims, correction=0, keepdim=True)
        return ((w - mean) * torch.rsqrt(var + self.eps)).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


def is_feeder(module: nn.Module) -> bool:
    """Whether a weight-side choice can act on ``module``: a Conv/Linear (ConvTranspose with
    ``groups=1``) with an initialized weight."""
    if not isinstance(module, FEEDER_TYPES):
        return False
    if isinstance(module, _ConvTransposeNd) and module.groups != 1:
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not isinstance(weight, UninitializedParameter)


def output_channels(module: nn.Module) -> int:
    """The output channels of a feeder (``out_features`` / ``out_channels``)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, _ConvNd):
        return module.out_channels
    raise TypeError(f"{type(module).__name__} is not a Conv/Linear layer")


def filter_dim(module: nn.Module) -> int:
    """The weight dim of a feeder's output filters: 1 for ConvTranspose, else 0."""
    return 1 if isinstance(module, _ConvTransposeNd) else 0


def _kind(parametrization: nn.Module) -> str | None:
    if isinstance(parametrization, WeightStandardization):
        return "ws"
    if isinstance(parametrization, _WeightNorm):
        return "wn"
    return None


def _hook_weight_norm(module: nn.Module) -> bool:
    """Whether the deprecated ``torch.nn.utils.weight_norm`` hook normalizes ``weight``."""
    from torch.nn.utils.weight_norm import WeightNorm

    return any(
        isinstance(hook, WeightNorm) and hook.name == "weight"
        for hook in module._forward_pre_hooks.values()
    )


def _parametrizations(module: nn.Module) -> list[nn.Module]:
    if not parametrize.is_parametrized(module, "weight"):
        return []
    lists = cast(nn.ModuleDict, module.parametrizations)
    return list(cast(nn.ModuleList, lists["weight"]))


def weight_norm_of(module: nn.Module) -> str | None:
    """``"ws"`` or ``"wn"`` when that normalizes ``module.weight``, else None.

    Reads autonorm's :class:`WeightStandardization`, torch's ``weight_norm`` parametrization and
    the deprecated ``torch.nn.utils.weight_norm`` hook.
    """
    kinds = [k for k in map(_kind, _parametrizations(module)) if k is not None]
    if kinds:
        return kinds[-1]
    return "wn" if _hook_weight_norm(module) else None


def foreign_parametrizations(module: nn.Module) -> list[str]:
    """Class names of the weight's parametrizations that are neither ``ws`` nor ``wn``."""
    return [type(p).__name__ for p in _parametrizations(module) if _kind(p) is None]


def weight_problems(module: nn.Module, weight: str | None, name: str = "") -> list[str]:
    """Everything that keeps ``set_weight_norm(module, weight)`` from working (empty: fine)."""
    label = f" {name!r}" if name else ""
    if not is_feeder(module):
        return [
            f"the feeder{label} is a {type(module).__name__}; weight-side normalization needs a "
            "Conv1d/2d/3d, Linear or ConvTranspose (groups=1) with an initialized weight"
        ]
    if weight_norm_of(module) == weight:
        return []
    problems = check_weight(weight)
    foreign = foreign_parametrizations(module)
    if foreign:
        problems.append(
            f"the weight of feeder{label} carries parametrizations autonorm did not add "
            f"({', '.join(foreign)}); remove them before changing its weight normalization"
        )
    if weight == "ws":
        tensor = cast(torch.Tensor, module.weight)
        fan_in = tensor.numel() // tensor.shape[filter_dim(module)]
        if fan_in < 2:
            problems.append(
                f"ws needs more than one weight per output filter, got {fan_in} (feeder{label}): "
                "a standardized single weight is 0"
            )
    return problems


def _remove(module: nn.Module) -> None:
    """Drop the weight's ws/wn, leaving the weight it computes now (the layer's function
    stays)."""
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    elif _hook_weight_norm(module):
        torch.nn.utils.remove_weight_norm(module, "weight")


def set_weight_norm(
    module: nn.Module, weight: str | None, *, slot: str | None = None, name: str = ""
) -> nn.Module:
    """Give ``module``'s weight the weight-side normalization ``weight`` (None: none), in place.

    The same normalization already there is kept (WN's learned ``g`` with it). Another is
    removed first, leaving the weight it computed: so ``ws`` -> none keeps the standardized
    weight, and ``wn`` starts from it with ``g = ||w||``, computing what the layer computed.
    ``ws`` changes the layer's function by design.

    Args:
        module: a Conv/Linear layer (see :func:`is_feeder`).
        weight: ``"ws"``, ``"wn"`` or None.
        slot: the norm slot this is for, recorded on the parametrization (so that
            :func:`autonorm.find_slots` finds the pair again without a probe).
        name: the module's name in its model, recorded likewise and used in messages.

    Returns:
        The module.

    Raises:
        ValueError: see :func:`weight_problems`.

    Example::

        >>> conv = set_weight_norm(nn.Conv2d(3, 4, 3), "wn")
        >>> weight_norm_of(conv), sorted(n for n, _ in conv.named_parameters())
        ('wn', ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1'])
    """
    problems = weight_problems(module, weight, name)
    if problems:
        raise ValueError("; ".join(problems))
    if weight_norm_of(module) != weight:
        _remove(module)
        if weight == "ws":
            parametrize.register_parametrization(
                module, "weight", WeightStandardization(dim=filter_dim(module))
            )
        elif weight == "wn":
            weight_norm(module, "weight", dim=filter_dim(module))
    if weight is not None and parametrize.is_parametrized(module, "weight"):
        parametrization = _parametrizations(module)[-1]
        setattr(parametrization, SLOT_TAG, slot)
        setattr(parametrization, FEEDER_TAG, name)
    return module


def tagged_slot(module: nn.Module) -> tuple[str, str] | None:
    """``(slot name, feeder name)`` recorded by :func:`set_weight_norm`, if any."""
    for parametrization in _parametrizations(module):
        slot = getattr(parametrization, SLOT_TAG, None)
        if _kind(parametrization) is not None and isinstance(slot, str):
            return slot, str(getattr(parametrization, FEEDER_TAG, ""))
    return None
