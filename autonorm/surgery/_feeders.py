"""A slot's *feeder*: the Conv/Linear layer whose output tensor is the slot's input.

A weight-side choice (``+ws``, ``+wn``) acts on the feeder. It is declared by the user, else
seen by the probe (the same tensor object, or a permuted view of it, unmodified in between),
else recorded by an earlier weight-side rewrite, else (no probe) read from an ``nn.Sequential``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from autonorm._errors import AutoNormError
from autonorm.norms import is_feeder, output_channels, tagged_slot
from autonorm.surgery._probe import Probe

#: Model attribute declaring feeders the probe cannot see: ``{slot name: feeder name or None}``.
FEEDERS_ATTR = "autonorm_feeders"


def declared_feeders(
    model: nn.Module,
    feeders: Mapping[str, str | None] | None,
    channels: Mapping[str, int],
) -> dict[str, str | None]:
    """The declared ``{slot name: feeder name or None}``, checked (every problem at once).

    Args:
        model: the model.
        feeders: the declaration, or None.
        channels: ``{slot name: channel count}`` for every name of every slot.

    Raises:
        AutoNormError: a declared feeder that is not a Conv/Linear layer of the model with the
            slot's channel count, or that names no slot.
    """
    if feeders is None:
        return {}
    if not isinstance(feeders, Mapping):
        raise AutoNormError(
            f"`feeders` must map slot names to layer names, got {type(feeders).__name__}"
        )
    problems = []
    out: dict[str, str | None] = {}
    for slot, feeder in feeders.items():
        if slot not in channels:
            problems.append(f"{slot!r} is not a norm slot")
            continue
        if feeder is None:
            out[slot] = None
            continue
        try:
            module = model.get_submodule(str(feeder))
        except AttributeError:
            problems.append(f"slot {slot!r}: the model has no module {feeder!r}")
            continue
        if not is_feeder(module):
            problems.append(
                f"slot {slot!r}: {feeder!r} is a {type(module).__name__}; a feeder must be a "
                "Conv1d/2d/3d, Linear or ConvTranspose (groups=1) layer"
            )
        elif output_channels(module) != channels[slot]:
            problems.append(
                f"slot {slot!r}: feeder {feeder!r} has {output_channels(module)} output channels, "
                f"the slot normalizes {channels[slot]}"
            )
        else:
            out[slot] = str(feeder)
    if problems:
        raise AutoNormError(
            f"declared feeders do not fit {type(model).__name__}:\n  " + "\n  ".join(problems)
        )
    return out


def tagged_feeders(feeder_modules: dict[int, tuple[nn.Module, str]]) -> dict[str, str]:
    """``{slot name: feeder name}`` from the weight-side normalizations autonorm applied,
    names moved by the prefix the model gained (wrapped) or lost (unwrapped) since."""
    out = {}
    for module, name in feeder_modules.values():
        tag = tagged_slot(module)
        if tag is None:
            continue
        slot, then = tag
        if name == then:
            out[slot] = name
        elif then and name.endswith("." + then):
            out[name[: -len(then)] + slot] = name
        elif name and then.endswith("." + name):
            lost = then[: -len(name)]
            if slot.startswith(lost):
                out[slot[len(lost) :]] = name
    return out


def _sequential_feeder(model: nn.Module, name: str) -> str | None:
    """The Conv/Linear run right before ``name`` by an ``nn.Sequential`` (its own forward)."""
    if not name:
        return None
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
        return None
    keys = list(parent._modules)
    index = keys.index(child)
    previous = parent._modules[keys[index - 1]] if index > 0 else None
    if previous is None or not is_feeder(previous):
        return None
    return f"{parent_name}.{keys[index - 1]}" if parent_name else keys[index - 1]


def feeder_of(
    model: nn.Module,
    names: list[str],
    num_features: int,
    key: int,
    probed: Probe | None,
    declared: dict[str, str | None],
    tagged: dict[str, str],
) -> str | None:
    """A slot's feeder: declared, else seen by the probe, else recorded by an earlier
    weight-side rewrite, else (no probe) read from an ``nn.Sequential``."""
    for name in names:
        if name in declared:
            return declared[name]
    candidate = None
    sources = probed.sources.get(key) if probed is not None else None
    if sources and len(set(sources)) == 1:  # fed by the same layer at every call
        candidate = sources[0]
    if candidate is None:
        candidate = next((tagged[n] for n in names if n in tagged), None)
    if candidate is None and not sources and len(names) == 1:
        candidate = _sequential_feeder(model, names[0])
    if candidate is None:
        return None
    module = model.get_submodule(candidate)
    return candidate if output_channels(module) == num_features else None


def recorded_feeder(model: nn.Module, name: str | None, num_features: int) -> str | None:
    """A feeder a config recorded, where the model still has it with the slot's channels."""
    if name is None:
        return None
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return name if is_feeder(module) and output_channels(module) == num_features else None
