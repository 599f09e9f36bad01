"""Model surgery: rewrite a model's norm slots from a :class:`~autonorm.NormConfig`.

:func:`apply_config` validates the whole config against the model before it changes anything,
builds every replacement, then installs them: affine weights, BatchNorm running statistics,
device, dtype, train/eval mode and ``requires_grad`` carry over, and a fused subclass keeps its
extra steps. :func:`to_switchable` and :func:`derive_config` are the learned path.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from autonorm._errors import AutoNormError, ConfigError
from autonorm.config import NormChoice, NormConfig
from autonorm.norms import SWITCHABLE_CANDIDATES, SwitchableNorm, check_choice, create_norm
from autonorm.norms.weight import set_weight_norm, weight_norm_of, weight_problems
from autonorm.slots import NormWithExtra, Slot, find_slots

log = logging.getLogger(__name__)

#: SwitchableNorm candidate -> the native choice computing the same statistics, per layout.
CANDIDATE_CHOICES: dict[str, dict[str, NormChoice]] = {
    "channels_first": {
        "instance": NormChoice("instancenorm"),
        "layer": NormChoice("groupnorm", {"groups": 1}),  # per sample over (C, positions)
        "batch": NormChoice("batchnorm"),
    },
    "channels_last": {
        "layer": NormChoice("layernorm"),
        "rms": NormChoice("rmsnorm"),
        "batch": NormChoice("batchnorm"),
    },
}


def _inner(module: nn.Module) -> nn.Module:
    return module.norm if isinstance(module, NormWithExtra) else module


def _factory(module: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` of the module's tensors (empty when it has none)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return {"device": tensor.device}
    return {}


def _has_running_stats(module: nn.Module) -> bool:
    return (
        isinstance(module, (_BatchNorm, SwitchableNorm))
        and getattr(module, "running_mean", None) is not None
        and getattr(module, "running_var", None) is not None
    )


def _carry(old: nn.Module, new: nn.Module, dropped: list[str], slot_name: str) -> None:
    """Copy affine weights (and running statistics between batch-statistics layers)."""
    with torch.no_grad():
        for attr in ("weight", "bias"):
            source = getattr(old, attr, None)
            if not isinstance(source, nn.Parameter):
                continue
            target = getattr(new, attr, None)
            if isinstance(target, nn.Parameter) and target.shape == source.shape:
                target.copy_(source)
                target.requires_grad_(source.requires_grad)
            else:
                dropped.append(f"{slot_name}.{attr}")
        if _has_running_stats(old) and _has_running_stats(new):
            new.running_mean.copy_(old.running_mean)
            new.running_var.copy_(old.running_var)
            if old.num_batches_tracked is not None and new.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(old.num_batches_tracked)
    if not any(p.requires_grad for p in old.parameters()) and any(True for _ in old.parameters()):
        for parameter in new.parameters():
            parameter.requires_grad_(False)  # a frozen slot stays frozen


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
    """
    old = _inner(module)
    factory = {**(default_factory or {}), **_factory(old)}
    new = create_norm(
        choice.name,
        _num_features(old) if num_features is None else num_features,
        layout=layout,
        input_ndim=input_ndim,
        **factory,
        **choice.params,
    )
    _carry(old, new, dropped if dropped is not None else [], slot_name)
    new.train(module.training)
    if extra:
        new = NormWithExtra(new, [(name, getattr(module, name)) for name in extra])
        new.train(module.training)
    return new


def _num_features(module: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return int(tuple(module.normalized_shape)[0])


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)


def _guard_transformer_fast_paths(model: nn.Module) -> None:
    """Keep torch's fused transformer inference paths honest after a rewrite.

    ``nn.TransformerEncoderLayer`` (eval, no grad) runs a fused kernel that applies *LayerNorm*
    with ``norm1.weight``/``norm1.bias`` whatever module sits there; ``nn.TransformerEncoder``
    converts to nested tensors on the same assumption. Where a norm is no longer a plain
    ``nn.LayerNorm`` both are switched off (and switched back on when it is again).
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            _toggle(module, "activation_relu_or_gelu", 0, _plain_layernorms(module))
        elif isinstance(module, nn.TransformerEncoder) and len(module.layers):
            _toggle(module, "use_nested_tensor", False, _plain_layernorms(module.layers[0]))


def _plain_layernorms(layer: nn.Module) -> bool:
    return all(
        type(getattr(layer, n)) is nn.LayerNorm for n in ("norm1", "norm2") if hasattr(layer, n)
    )


def _toggle(module: nn.Module, attr: str, off: Any, enabled: bool) -> None:
    saved_attr = f"_autonorm_saved_{attr}"
    if not hasattr(module, attr):
        return
    if not enabled:
        if saved_attr not in vars(module):
            setattr(module, saved_attr, getattr(module, attr))
        setattr(module, attr, off)
    elif saved_attr in vars(module):
        setattr(module, attr, vars(module).pop(saved_attr))


def validate_config(
    slots: Sequence[Slot], config: NormConfig, *, partial: bool = False, model_name: str = "model"
) -> dict[str, tuple[Slot, NormChoice]]:
    """Match a config to slots and check every choice.

    Returns:
        ``{slot name: (slot, choice)}`` for the slots the config names.

    Raises:
        ConfigError: every problem of the config in one message.
    """
    by_name = {name: slot for slot in slots for name in slot.names}
    problems, matched = [], {}
    unknown = [name for name in config.choices if name not in by_name]
    if unknown:
        known = [s.name for s in slots]
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        problems.append(
            f"{unknown} are not norm slots of {model_name}; its slots are: {shown or 'none'}"
        )
    for name, choice in config.choices.items():
        slot = by_name.get(name)
        if slot is None:
            continue
        if slot.name in matched and matched[slot.name][1] != choice:
            problems.append(
                f"slot {slot.name!r} is given twice (also as {name!r}) with different choices"
            )
            continue
        matched[slot.name] = (slot, choice)
        if choice == slot.keep_choice():
            continue
        for problem in slot.check(choice):
            problems.append(f"{problem} (slot {slot.name!r})")
        if slot.refusal is not None and choice.base != slot.keep_choice().base:
            problems.append(f"slot {slot.name!r} cannot be rewritten: {slot.refusal}")
    if not partial:
        missing = [s.name for s in slots if s.name not in matched]
        if missing:
            problems.append(
                f"the config has no choice for slots {missing} (pass partial=True to leave them as they are)"
            )
    if problems:
        raise ConfigError(f"config does not fit {model_name}:\n  " + "\n  ".join(problems))
    return matched


def apply_config(
    model: nn.Module,
    config: NormConfig | Mapping[str, Any],
    *,
    partial: bool = False,
    example_input: Any = None,
    slots: Sequence[Slot] | None = None,
    feeders: Mapping[str, str | None] | None = None,
) -> nn.Module:
    """Rewrite ``model``'s norm slots as ``config`` says, in place.

    Nothing changes unless the whole config is valid. A slot whose choice rebuilds its current
    layer (its "keep" choice) is left untouched.

    A choice's weight-side part (``+ws``, ``+wn``) is applied to the slot's feeder (the
    Conv/Linear layer whose output the slot normalizes, :attr:`Slot.feeder`) as a
    ``torch.nn.utils.parametrize`` parametrization; a choice without one removes a ws/wn the
    feeder carries, leaving the weight it computed. Applying a config gives the config's
    model whatever was applied before.

    Args:
        model: the model.
        config: a :class:`~autonorm.NormConfig` or a ``{slot name: choice}`` mapping.
        partial: allow slots the config does not name (they stay as they are).
        example_input: input for the probe (default: the model's ``example_input_array``).
        slots: the model's current slots, when already found (skips the probe).
        feeders: ``{slot name: layer name or None}``: the layers feeding slots that the probe
            cannot see (see :func:`~autonorm.find_slots`).

    Returns:
        The model (a new root when the root itself is a slot).

    Raises:
        ConfigError: unknown slot names, slots missing from the config, choices invalid for a
            slot or whose layer cannot be built, weight-side parts for slots without a feeder or
            differing between slots that share one (all collected into one message). The model
            is unchanged then.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> apply_config(model, {"1": {"name": "groupnorm", "groups": 4}})[1]
        GroupNorm(4, 8, eps=1e-05, affine=True, bias=True)
    """
    if not isinstance(config, NormConfig):
        config = NormConfig(config)
    if slots is None:
        slots = find_slots(model, example_input, feeders=feeders)
    matched = validate_config(slots, config, partial=partial, model_name=type(model).__name__)
    dropped: list[str] = []
    replacements = {}
    problems = []
    model_factory = _factory(model)  # for slots whose layer has no tensors of its own
    for name, (slot, choice) in matched.items():
        if choice.base == slot.keep_choice().base:
            continue
        try:
            replacements[slot] = build_replacement(
                model.get_submodule(name),
                choice,
                layout=slot.layout,
                input_ndim=slot.input_ndim,
                extra=slot.extra,
                dropped=dropped,
                slot_name=name,
                default_factory=model_factory,
                num_features=slot.num_features,
            )
        except (ValueError, TypeError) as err:  # a parameter value the layer refuses
            problems.append(f"{choice.label}: {err} (slot {name!r})")
    weights = _plan_weights(model, slots, matched, problems)
    if problems:
        raise ConfigError(
            f"config does not fit {type(model).__name__}:\n  " + "\n  ".join(problems)
        )
    for slot, new in replacements.items():
        if slot.name == "":
            model = new
            continue
        for name in slot.names:
            _set_module(model, name, new)
    if dropped:
        warnings.warn(
            f"the new layers have no place for {len(dropped)} learned parameter(s) of the old ones "
            f"(e.g. {dropped[:3]}): they are dropped",
            stacklevel=2,
        )
    for feeder, (weight, slot_name) in weights.items():
        set_weight_norm(model.get_submodule(feeder), weight, slot=slot_name, name=feeder)
    _guard_transformer_fast_paths(model)
    log.debug(
        "apply_config: rewrote %d of %d slots and the weights of %d feeders",
        len(replacements),
        len(slots),
        len(weights),
    )
    return model


def _plan_weights(
    model: nn.Module,
    slots: Sequence[Slot],
    matched: Mapping[str, tuple[Slot, NormChoice]],
    problems: list[str],
) -> dict[str, tuple[str | None, str]]:
    """``{feeder name: (weight part, slot name)}`` for the feeders whose weight-side
    normalization changes; problems go to ``problems``. Slots sharing a feeder must agree
    (a slot the config leaves out asks for what its feeder carries now)."""
    wanted: dict[str, dict[str | None, list[str]]] = {}
    for slot in slots:
        if slot.feeder is None:
            continue
        choice = matched[slot.name][1] if slot.name in matched else slot.keep_choice()
        wanted.setdefault(slot.feeder, {}).setdefault(choice.weight, []).append(slot.name)
    plan = {}
    for feeder, by_weight in wanted.items():
        if len(by_weight) > 1:
            given = "; ".join(f"{w or 'none'} for {names}" for w, names in by_weight.items())
            problems.append(
                f"slots sharing the feeder {feeder!r} need the same weight part, got {given}"
            )
            continue
        ((weight, names),) = by_weight.items()
        module = model.get_submodule(feeder)
        if weight_norm_of(module) == weight:
            continue
        problems.extend(f"{p} (slot {names[0]!r})" for p in weight_problems(module, weight, feeder))
        plan[feeder] = (weight, names[0])
    return plan


def to_switchable(
    model: nn.Module,
    slots: Sequence[str | Slot] | None = None,
    *,
    candidates: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    example_input: Any = None,
    **sn_kwargs: Any,
) -> nn.Module:
    """Turn every (or the given) slot into a :class:`~autonorm.norms.SwitchableNorm`.

    Args:
        model: the model, rewritten in place.
        slots: slot names (or :class:`Slot` objects) to convert; default all.
        candidates: SwitchableNorm candidates: one tuple for every slot or ``{layout: tuple}``.
            Default: the paper's, less ``instance`` where the probe saw one position per sample
            and channel (an ``(N, C)`` input), whose instance statistics are undefined.
        example_input: input for the probe (default: the model's ``example_input_array``).
        **sn_kwargs: other SwitchableNorm arguments (``eps``, ``momentum``).

    Returns:
        The model.
    """
    found = find_slots(model, example_input)
    wanted = None if slots is None else {s if isinstance(s, str) else s.name for s in slots}
    choices = {}
    for slot in found:
        if wanted is not None and not wanted & set(slot.names):
            continue
        params = dict(sn_kwargs)
        layout_candidates = (
            candidates.get(slot.layout) if isinstance(candidates, Mapping) else candidates
        )
        if layout_candidates is None and _single_position(slot):
            layout_candidates = [c for c in SWITCHABLE_CANDIDATES[slot.layout] if c != "instance"]
        if layout_candidates is not None:
            params["candidates"] = tuple(layout_candidates)
        choices[slot.name] = NormChoice("switchable", params, slot.keep_choice().weight)
    if wanted is not None:
        unknown = wanted - {n for s in found for n in s.names}
        if unknown:
            raise ConfigError(f"{sorted(unknown)} are not norm slots of {type(model).__name__}")
    return apply_config(model, NormConfig(choices), partial=True, slots=found)


def _single_position(slot: Slot) -> bool:
    """Whether the probe saw one position per (sample, channel) at a channels-first slot."""
    if slot.input_shape is None or slot.layout != "channels_first":
        return False
    return math.prod(slot.input_shape[2:]) <= 1


def switchable_layers(model: nn.Module) -> dict[str, SwitchableNorm]:
    """Slot name -> the SwitchableNorm in that slot."""
    out = {}
    for slot in find_slots(model, probe=False):
        module = _inner(model.get_submodule(slot.name))
        if isinstance(module, SwitchableNorm):
            out[slot.name] = module
    return out


def ranked_choices(sn: SwitchableNorm) -> list[tuple[NormChoice, float]]:
    """The native choices of an SN layer's candidates, by learned weight (mean and variance
    weights averaged), highest first."""
    weights = sn.mixing_weights()
    scores = {c: (weights["mean"][c] + weights["var"][c]) / 2 for c in sn.candidates}
    order = sorted(sn.candidates, key=lambda c: -scores[c])
    return [(CANDIDATE_CHOICES[sn.layout][c], scores[c]) for c in order]


def derive_config(model: nn.Module, *, example_input: Any = None) -> NormConfig:
    """The discrete config learned by the model's SwitchableNorm layers.

    Each slot takes the candidate with the largest learned weight (mean and variance weights
    averaged), mapped to its native layer: ``instance`` -> instancenorm, ``layer`` ->
    groupnorm(groups=1) (channels first) or layernorm (channels last), ``rms`` -> rmsnorm,
    ``batch`` -> batchnorm. A candidate invalid for the slot's input (instance statistics of an
    ``(N, C)`` input) is passed over. A slot's weight-side part (``+ws``/``+wn`` on its feeder)
    is kept. The learned weights are recorded in the metadata.

    Raises:
        AutoNormError: the model has no SwitchableNorm.
    """
    slots = {s.name: s for s in find_slots(model, example_input)}
    layers = switchable_layers(model)
    if not layers:
        raise AutoNormError(
            f"{type(model).__name__} has no SwitchableNorm: convert it with autonorm.to_switchable "
            "(or train with AutoNorm(mode='learn')) first"
        )
    choices, weights = {}, {}
    for name, sn in layers.items():
        slot = slots[name]
        ranked = ranked_choices(sn)
        valid = [
            c
            for c, _ in ranked
            if not check_choice(
                c.name,
                slot.num_features,
                layout=slot.layout,
                input_shape=slot.input_shape,
                **c.params,
            )
        ]
        # the weight side stays: SN learned its weights with what the feeder carries
        choices[name] = (valid[0] if valid else ranked[0][0]).with_weight(slot.keep_choice().weight)
        weights[name] = sn.mixing_weights()
    metadata = {
        "source": "switchable",
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights": weights,
    }
    return NormConfig(choices, metadata=metadata)


__all__ = [
    "CANDIDATE_CHOICES",
    "apply_config",
    "build_replacement",
    "derive_config",
    "ranked_choices",
    "switchable_layers",
    "to_switchable",
    "validate_config",
]
