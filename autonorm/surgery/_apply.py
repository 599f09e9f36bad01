"""Model surgery: rewrite a model's norm slots from a :class:`~autonorm.NormConfig`.

:func:`apply_config` validates the whole config against the model before it changes anything,
builds every replacement (:mod:`autonorm.surgery._rebuild`), then installs them: affine weights,
BatchNorm running statistics, device, dtype, train/eval mode and ``requires_grad`` carry over,
and a fused subclass keeps its extra steps. :func:`to_switchable` turns slots into learned
SwitchableNorm layers (the learned path; :mod:`autonorm.surgery._derive` reads them back).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from autonorm._errors import ConfigError
from autonorm.config import NormChoice, NormConfig
from autonorm.norms import (
    SWITCHABLE_CANDIDATES,
    SwitchableNorm,
    set_weight_norm,
    weight_norm_of,
    weight_problems,
)
from autonorm.surgery._activations import place_activation
from autonorm.surgery._probe import call_with_example
from autonorm.surgery._rebuild import (
    BATCH_FAMILY,
    build_replacement,
    factory_of,
    inner,
    settled_choice,
)
from autonorm.surgery._recalibrate import recalibrate_batchnorm
from autonorm.surgery._slots import Slot, find_slots

log = logging.getLogger(__name__)


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


def _settings_of(slot: Slot) -> NormChoice:
    """The choice whose settings a new choice keeps: the slot's layer, or the layer a config
    recorded before a SwitchableNorm (which keeps no group count) took the slot."""
    keep = slot.keep_choice()
    return slot.original if keep.name == "switchable" and slot.original is not None else keep


def validate_config(
    slots: Sequence[Slot], config: NormConfig, *, partial: bool = False, model_name: str = "model"
) -> dict[str, tuple[Slot, NormChoice]]:
    """Match a config to slots and check every choice.

    Each choice is settled first (:func:`~autonorm.surgery._rebuild.settled_choice`): what it
    does not set itself it takes from the slot's layer, so that a rewrite within a family keeps
    the layer's eps, momentum, affine, tracking and group count, and one across families keeps
    a non-default eps.

    Returns:
        ``{slot name: (slot, settled choice)}`` for the slots the config names.

    Raises:
        ConfigError: every problem of the config in one message.
    """
    by_name = {name: slot for slot in slots for name in slot.names}
    problems: list[str] = []
    matched: dict[str, tuple[Slot, NormChoice]] = {}
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
        choice = settled_choice(choice, _settings_of(slot))
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
        elif slot.unsettled is not None and choice.base != slot.keep_choice().base:
            problems.append(f"slot {slot.name!r} cannot be rewritten: {slot.unsettled}")
    if not partial:
        missing = [s.name for s in slots if s.name not in matched]
        if missing:
            problems.append(
                f"the config has no choice for slots {missing} (pass partial=True to leave them as they are)"
            )
    if problems:
        raise ConfigError(f"config does not fit {model_name}:\n  " + "\n  ".join(problems))
    return matched


def _build_replacements(
    model: nn.Module,
    matched: Mapping[str, tuple[Slot, NormChoice]],
    dropped: list[str],
    problems: list[str],
) -> dict[Slot, nn.Module]:
    """The new layer of every slot whose norm changes (keep choices are left out); layers that
    cannot be built go to ``problems``, parameters without a place in the new layer to
    ``dropped``."""
    replacements = {}
    model_factory = factory_of(model)  # for slots whose layer has no tensors of its own
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
                weight_offset=slot.weight_offset,
            )
        except (ValueError, TypeError) as err:  # a parameter value the layer refuses
            problems.append(f"{choice.label}: {err} (slot {name!r})")
    return replacements


def _install(model: nn.Module, replacements: Mapping[Slot, nn.Module]) -> nn.Module:
    """Put each new layer in every place of its slot; the new root when the root is a slot.
    A new layer that includes its activation holds the slot's activation; one that does not
    gives a held activation back."""
    for slot, new in replacements.items():
        if slot.name == "":
            model = new
        else:
            for name in slot.names:
                _set_module(model, name, new)
        includes_activation = getattr(inner(new), "includes_activation", False)
        place_activation(model, slot.activation, includes_activation)
    return model


def apply_config(
    model: nn.Module,
    config: NormConfig | Mapping[str, Any],
    *,
    partial: bool = False,
    example_input: Any = None,
    slots: Sequence[Slot] | None = None,
    feeders: Mapping[str, str | None] | None = None,
    check_model: bool = True,
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
            Without one, the config's probe records (:meth:`NormConfig.with_probe`) settle
            the slots' layouts, input shapes and feeders.
        slots: all of the model's current slots, when already found (:func:`find_slots` on the
            model as it is now, without include/exclude): then no probe runs.
        feeders: ``{slot name: layer name or None}``: the layers feeding slots that the probe
            cannot see (see :func:`~autonorm.find_slots`).
        check_model: refuse a config whose metadata records another ``model_class`` than the
            model's class (or one of its base classes); False applies it anyway.

    Returns:
        The model (a new root when the root itself is a slot).

    Raises:
        ConfigError: unknown slot names, slots missing from the config, choices invalid for a
            slot or whose layer cannot be built, weight-side parts for slots without a feeder or
            differing between slots that share one (all collected into one message). The model
            is unchanged then. A config recorded for another model class (``check_model``).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> apply_config(model, {"1": {"name": "groupnorm", "groups": 4}})[1]
        GroupNorm(4, 8, eps=1e-05, affine=True, bias=True)
    """
    if not isinstance(config, NormConfig):
        config = NormConfig(config)
    if check_model:
        check_model_class(model, config)
    if slots is None:
        slots = find_slots(model, example_input, feeders=feeders, records=config.probe)
    matched = validate_config(slots, config, partial=partial, model_name=type(model).__name__)
    dropped: list[str] = []
    problems: list[str] = []
    replacements = _build_replacements(model, matched, dropped, problems)
    weights = _plan_weights(model, slots, matched, problems)
    if problems:
        raise ConfigError(
            f"config does not fit {type(model).__name__}:\n  " + "\n  ".join(problems)
        )
    model = _install(model, replacements)
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


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_model_class(model: nn.Module, config: NormConfig) -> None:
    """Refuse a config recorded (metadata ``model_class``) for another class than ``model``'s.

    The model's class or any of its base classes matches; a class recorded from a script
    (``__main__.Net``) matches by its name alone, wherever the class is imported from now.

    Raises:
        ConfigError: the recorded class is none of them.
    """
    recorded = config.metadata.get("model_class")
    if not isinstance(recorded, str) or not recorded:
        return
    if not any(_same_class(recorded, cls) for cls in type(model).__mro__):
        raise ConfigError(
            f"the config was made for {recorded}, not for {_class_path(type(model))}; pass "
            "check_model=False to apply it anyway (AutoNorm(config=..., check_model=False) in "
            "the callback)"
        )


def _same_class(recorded: str, cls: type) -> bool:
    if _class_path(cls) == recorded:
        return True
    if recorded.startswith("__main__."):
        return recorded.removeprefix("__main__.") == cls.__qualname__
    return cls.__module__ == "__main__" and recorded.endswith(f".{cls.__qualname__}")


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
    config: NormConfig | None = None,
    init: str = "uniform",
    **sn_kwargs: Any,
) -> nn.Module:
    """Turn every (or the given) slot into a :class:`~autonorm.norms.SwitchableNorm`.

    Args:
        model: the model, rewritten in place.
        slots: the slots to convert; default all. Slot names (or a mix of names and
            :class:`Slot` objects) are looked up by a fresh :func:`find_slots`. A list of
            :class:`Slot` objects only is taken as already found on the model as it is now
            (:func:`find_slots`; ``include``/``exclude`` may have narrowed it): those slots are
            converted and no probe runs.
        candidates: SwitchableNorm candidates: one tuple for every slot or ``{layout: tuple}``.
            Default: the paper's, less ``instance`` where the probe saw one position per sample
            and channel (an ``(N, C)`` input), whose instance statistics are undefined.
        example_input: input for the probe (default: the model's ``example_input_array``).
        config: a config whose probe records (:meth:`NormConfig.with_probe`) settle the
            slots where no probe runs (no example input).
        init: ``"uniform"`` (equal mixing weights, the paper's start) or ``"original"``
            (for pretrained models: each layer starts with most of its mix on the statistic of
            the normalizer it replaces, BN -> batch, LN -> layer, RMS -> rms, IN -> instance,
            GN -> layer or instance, affine and running statistics carried over, so the model
            computes nearly what it did; see :meth:`SwitchableNorm.start_on`).
        **sn_kwargs: other SwitchableNorm arguments (``eps``, ``momentum``).

    Returns:
        The model.

    Raises:
        ConfigError: a slot name that is not a norm slot of the model.
        ValueError: an unknown ``init``.
    """
    if init not in SWITCHABLE_INITS:
        raise ValueError(f"`init` must be one of {SWITCHABLE_INITS}, got {init!r}")
    given = None if slots is None else list(slots)
    objects = [s for s in given or () if isinstance(s, Slot)]
    wanted: set[str] | None = None
    if given and len(objects) == len(given):  # found already: no probe
        found = objects
    else:
        records = None if config is None else config.probe
        found = find_slots(model, example_input, records=records)
        wanted = None if given is None else {s if isinstance(s, str) else s.name for s in given}
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
    model = apply_config(model, NormConfig(choices), partial=True, slots=found)
    if init == "original":
        converted = [s for s in found if s.name in choices]
        _start_on_original(model, converted)
        if example_input is None:
            example_input = getattr(model, "example_input_array", None)
        if example_input is not None:
            _calibrate_new_batch_branches(model, converted, example_input)
    return model


#: How :func:`to_switchable` starts the mixing weights.
SWITCHABLE_INITS = ("uniform", "original")
#: The SwitchableNorm statistic closest to each kind of normalizer, best first.
_ORIGINAL_STATISTIC = {
    "batchnorm": ("batch",),
    "syncbatchnorm": ("batch",),
    "frozenbatchnorm": ("batch",),
    "layernorm": ("layer", "rms"),
    "rmsnorm": ("rms", "layer"),
    "instancenorm": ("instance",),
    "groupnorm": ("layer", "instance"),
}


def _original_statistic(slot: Slot, candidates: Sequence[str]) -> str | None:
    """The candidate that computes what ``slot``'s original layer did (None: none does)."""
    keep = slot.keep_choice()
    order = _ORIGINAL_STATISTIC.get(keep.name, ())
    if keep.name == "groupnorm" and keep.params.get("groups") == slot.num_features:
        order = ("instance", "layer")  # one channel per group: instance statistics
    return next((c for c in order if c in candidates), None)


def _start_on_original(model: nn.Module, slots: Sequence[Slot]) -> None:
    """``init="original"``: each new SwitchableNorm starts on its slot's old statistic."""
    uniform = []
    for slot in slots:
        layer = inner(model if slot.name == "" else model.get_submodule(slot.name))
        assert isinstance(layer, SwitchableNorm)
        statistic = _original_statistic(slot, layer.candidates)
        if statistic is None:
            uniform.append(f"{slot.name} ({slot.keep_choice().label})")
        else:
            layer.start_on(statistic)
    if uniform:
        warnings.warn(
            f"init='original': no SwitchableNorm candidate computes what {len(uniform)} slot(s) "
            f"did, they start uniform: {uniform[:5]}",
            stacklevel=3,
        )


def _calibrate_new_batch_branches(
    model: nn.Module, slots: Sequence[Slot], example_input: Any
) -> None:
    """``init="original"``: a batch branch where the old layer kept no running statistics (LN,
    RMS, GN, IN) takes them from the example input, so that eval mode starts near the old output
    too (fresh 0/1 statistics at even 0.5% weight move small activations far). Branches that
    carried a BatchNorm's statistics are left as they are."""
    fresh = []
    for slot in slots:
        layer = inner(model if slot.name == "" else model.get_submodule(slot.name))
        new_branch = slot.keep_choice().name not in BATCH_FAMILY  # else statistics carried
        if new_branch and isinstance(layer, SwitchableNorm) and layer.running_mean is not None:
            fresh.append(layer)
    if fresh:
        recalibrate_batchnorm(
            model,
            [example_input],
            num_batches=1,
            forward=call_with_example,
            modules=fresh,
        )


def _single_position(slot: Slot) -> bool:
    """Whether the probe saw one position per (sample, channel) at a channels-first slot."""
    if slot.input_shape is None or slot.layout != "channels_first":
        return False
    return math.prod(slot.input_shape[2:]) <= 1


__all__ = [
    "SWITCHABLE_INITS",
    "apply_config",
    "check_model_class",
    "to_switchable",
    "validate_config",
]
