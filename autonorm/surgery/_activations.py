"""A slot's *activation*: the module that applies the nonlinearity right after the slot's norm.

A choice that includes its activation (FRN's TLU, EvoNorm-S0's gate) replaces the norm and that
activation; a slot can take one only where surgery knows the activation:

- a fused norm-activation module (timm's ``BatchNormAct2d``): its activation child;
- the next module of the ``nn.Sequential`` holding the slot, when it is an activation;
- a declaration, ``find_slots(..., activations={slot: module name})`` or the model's
  ``autonorm_activations`` attribute.

An activation module used at several places (torchvision's ResNet blocks call one ``relu``
three times) is not offered: replacing it would change the other places too.

When such a choice is installed, the activation is *held*: a :class:`HeldActivation` (an
identity) takes its place and keeps the original, which a later rewrite to a choice without an
activation gives back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from autonorm._errors import AutoNormError

#: Model attribute declaring activations surgery cannot see: ``{slot name: module name}``.
ACTIVATIONS_ATTR = "autonorm_activations"
#: Modules taken for an activation after a norm.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.Mish,
    nn.Hardswish,
    nn.ELU,
    nn.CELU,
    nn.SELU,
)


class HeldActivation(nn.Module):
    """The place of an activation that the slot's norm now includes: passes its input through
    and keeps the original activation (not run) to give back."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, (*ACTIVATION_TYPES, HeldActivation))


def module_uses(model: nn.Module) -> dict[int, int]:
    """How many places of the model hold each module."""
    counts: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    return counts


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _next_in_sequential(model: nn.Module, name: str) -> str | None:
    """The name of the module after ``name`` in the ``nn.Sequential`` holding it, if any."""
    if not name:
        return None
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    at = keys.index(attr)
    return _join(parent_name, keys[at + 1]) if at + 1 < len(keys) else None


def declared_activations(
    model: nn.Module,
    activations: Mapping[str, str] | None,
    slot_names: Sequence[str],
    uses: Mapping[int, int],
) -> dict[str, str]:
    """The declared ``{slot name: activation module name}``, checked (every problem at once).

    Raises:
        AutoNormError: a name that is no slot, a module the model does not have, or one it
            uses at several places (holding it would change the others too).
    """
    if activations is None:
        return {}
    if not isinstance(activations, Mapping):
        raise AutoNormError(
            f"`activations` must map slot names to module names, got {type(activations).__name__}"
        )
    problems = []
    for slot, name in activations.items():
        if slot not in slot_names:
            problems.append(f"{slot!r} is not a norm slot")
            continue
        try:
            module = model.get_submodule(str(name))
        except AttributeError:
            problems.append(f"slot {slot!r}: the model has no module {name!r}")
            continue
        if uses.get(id(module), 0) > 1:
            problems.append(
                f"slot {slot!r}: {name!r} is used at {uses[id(module)]} places of the model; "
                "a choice that includes its activation would change them all (give the slot "
                "an activation module of its own)"
            )
    if problems:
        raise AutoNormError("declared activations do not fit the model: " + "; ".join(problems))
    return {slot: str(name) for slot, name in activations.items()}


def activation_of(
    model: nn.Module,
    names: Sequence[str],
    extra: Sequence[str] | None,
    declared: Mapping[str, str],
    uses: Mapping[int, int],
) -> str | None:
    """The name of the activation after the slot named ``names`` (None: none is known).

    Args:
        model: the model.
        names: the slot's names (a shared norm, with several, has no activation unless
            declared).
        extra: the slot's child modules run after its norm (a fused module).
        declared: the declared activations.
        uses: :func:`module_uses` of the model.
    """
    for name in names:
        if name in declared:
            return declared[name]
    if len(names) != 1:
        return None
    candidates = [_join(names[0], child) for child in extra or ()]
    following = _next_in_sequential(model, names[0])
    if not candidates and following is not None:
        candidates = [following]
    for candidate in candidates:
        module = model.get_submodule(candidate)
        if _is_activation(module) and uses.get(id(module), 0) == 1:
            return candidate
    return None


def held(model: nn.Module, name: str | None) -> bool:
    """Whether the activation at ``name`` is held by the slot's norm."""
    return name is not None and isinstance(model.get_submodule(name), HeldActivation)


def place_activation(model: nn.Module, name: str | None, includes_activation: bool) -> None:
    """Hold the activation at ``name`` when the slot's new norm includes one, else give a held
    activation back."""
    if name is None:
        return
    module = model.get_submodule(name)
    if includes_activation and not isinstance(module, HeldActivation):
        replacement: nn.Module = HeldActivation(module)
    elif not includes_activation and isinstance(module, HeldActivation):
        replacement = module.original
    else:
        return
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, replacement)
