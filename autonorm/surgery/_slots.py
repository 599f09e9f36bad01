"""Find the norm slots of a model: which modules normalize, their channels, layout and input shape.

A slot is a module that normalizes: torch's norm classes and their subclasses, autonorm's own
layers, a :class:`NormWithExtra` left by an earlier rewrite, and any class registered with
:func:`register_slot_type`. With an example input, one probe forward pass (eval mode, no grad,
forward hooks; :mod:`autonorm.surgery._probe`) records each slot's input shape; the layout is then
read from the shape, not from the class alone.

A subclass with a forward of its own (``LayerNorm2d`` permuting around ``nn.LayerNorm``, a
``BatchNormAct2d`` applying its ``act`` child) is checked: its registry kind rebuilt with its
weights, followed by its child modules, must reproduce its output on the probe's input (on small
random inputs without a probe). A slot that passes keeps the children on rewrite; one that
fails can only keep its layer (:attr:`Slot.extra` is None).

The probe also records each slot's *feeder* (:mod:`autonorm.surgery._feeders`): the Conv/Linear
layer whose output tensor is the slot's input, on which a weight-side choice (``+ws``, ``+wn``)
acts. Where the probe cannot see it, declare it.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from autonorm.config import NormChoice, SlotRecord
from autonorm.norms import (
    NORM_NAMES,
    check_choice,
    get_spec,
    is_feeder,
    weight_norm_of,
)
from autonorm.surgery._activations import (
    ACTIVATIONS_ATTR,
    activation_of,
    declared_activations,
    held,
    module_uses,
)
from autonorm.surgery._detect import custom_layouts, norm_like, refusal
from autonorm.surgery._feeders import (
    FEEDERS_ATTR,
    declared_feeders,
    feeder_of,
    recorded_feeder,
    tagged_feeders,
)
from autonorm.surgery._probe import (
    Probe,
    layouts_from_shape,
    run_probe,
)
from autonorm.surgery._rebuild import keep_choice_of
from autonorm.surgery._slot_types import (
    class_reading,
    library_reading,
)

#: Glob patterns on slot names (one or several; None: no selection).
SlotPatterns = str | Sequence[str] | None


def _native_forward(module: nn.Module) -> bool:
    """Whether the module's forward is that of a torch or autonorm class (nothing extra)."""
    forward = type(module).forward
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return (
                cls.__module__.startswith(("torch.", "autonorm."))
                and vars(cls)["forward"] is forward
            )
    return True


@dataclass(frozen=True)
class Slot:
    """One norm slot of a model.

    Attributes:
        name: dotted module path, as ``named_modules()`` gives it (the first one for a module
            registered at several places).
        kind: registry name of the layer in the slot (``batchnorm``, ``layernorm``, ...).
        num_features: channel count C.
        layout: ``"channels_first"`` (``(N, C, *)``) or ``"channels_last"`` (``(..., C)``).
        input_shape: input shape seen by the probe, or None.
        module_class: qualified class name of the layer in the slot.
        aliases: other names of the same module (a shared module is one slot).
        extra: child modules run after the norm (a fused subclass), kept on rewrite; None
            when the slot's forward does more than autonorm can reproduce.
        reached: whether the probe reached the slot (None without a probe).
        feeder: dotted name of the Conv/Linear layer whose output is the slot's input (the
            layer a weight-side choice ``+ws``/``+wn`` acts on), or None: the input comes from
            elsewhere (an add, an activation), from several places, or is unknown.
        weight_offset: what the slot's layer adds to its weight (1 for Gemma's
            ``x * (1 + w)``); a rewrite carries ``weight + weight_offset`` over.
        activation: dotted name of the activation module right after the slot's norm (the
            child of a fused module, the next module of an ``nn.Sequential``, or declared), or
            None: unknown. A choice that includes its activation (``frn``, ``evonorm_s0``)
            needs one (:mod:`autonorm.surgery._activations`).
        activation_held: the slot's norm includes its activation and holds the original one
            (to give back on a rewrite to a choice without an activation).
        original: the slot's layer before an earlier rewrite, as a config recorded it.
        unsettled: why the slot's layout is unknown (None: settled); a rewrite is refused.
    """

    name: str
    kind: str
    num_features: int
    layout: str
    input_shape: tuple[int, ...] | None = None
    module_class: str = ""
    aliases: tuple[str, ...] = ()
    extra: tuple[str, ...] | None = ()
    reached: bool | None = None
    feeder: str | None = None
    weight_offset: float = 0.0
    activation: str | None = None
    activation_held: bool = False
    keep: NormChoice | None = field(default=None, compare=False, repr=False)
    refusal: str | None = field(default=None, compare=False, repr=False)
    original: NormChoice | None = field(default=None, compare=False, repr=False)
    unsettled: str | None = field(default=None, compare=False, repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name of the slot's module."""
        return (self.name, *self.aliases)

    def keep_choice(self) -> NormChoice:
        """The choice that keeps the slot's layer as it is (with the weight-side part its
        feeder carries, if any)."""
        return self.keep if self.keep is not None else NormChoice(self.kind)

    def check(self, choice: NormChoice | str | Mapping[str, Any]) -> list[str]:
        """Everything that keeps ``choice`` from working on this slot (empty: valid).

        The norm layer is checked with :func:`autonorm.norms.check_choice` unless the choice
        keeps the slot's layer; a weight-side part needs a feeder.

        Example::

            >>> slot = Slot("bn", "batchnorm", 8, "channels_first", (2, 8, 4, 4))
            >>> slot.check("groupnorm(groups=3)+ws")  # doctest: +NORMALIZE_WHITESPACE
            ['`groups` must divide num_features, got groups=3, num_features=8',
             "ws needs the Conv/Linear layer that feeds the slot, and its input does not come
              straight from one (declare it: find_slots(..., feeders={'bn': '<layer name>'}))"]
        """
        choice = NormChoice.parse(choice)
        keep = self.keep_choice()
        problems = []
        if choice.base != keep.base:
            problems += check_choice(
                choice.name,
                self.num_features,
                layout=self.layout,
                input_shape=self.input_shape,
                **choice.params,
            )
            problems += self._activation_problems(choice.name, keep.name)
        if choice.weight != keep.weight and choice.weight is not None and self.feeder is None:
            problems.append(
                f"{choice.weight} needs the Conv/Linear layer that feeds the slot, and its input "
                "does not come straight from one (declare it: "
                f"find_slots(..., feeders={{{self.name!r}: '<layer name>'}}))"
            )
        return problems

    def _activation_problems(self, name: str, current: str) -> list[str]:
        """What keeps a choice from taking over, or giving back, the slot's activation."""
        if name not in NORM_NAMES:
            return []  # check_choice said so
        spec = get_spec(name)
        if spec.activation and self.activation is None:
            return [
                f"{name} includes its activation and no activation is known after this slot "
                "(a fused norm-activation module, an activation right after it in an "
                "nn.Sequential, or one declared: "
                f"find_slots(..., activations={{{self.name!r}: '<activation module>'}}))"
            ]
        if get_spec(current).activation and not spec.activation and not self.activation_held:
            return [
                f"the slot's {current} includes its activation and holds no original one to "
                f"give back, so {name} would leave the slot without an activation"
            ]
        return []

    @property
    def input_ndim(self) -> int | None:
        return None if self.input_shape is None else len(self.input_shape)

    def record(self) -> SlotRecord:
        """What was found of the slot, for a config to carry (:meth:`NormConfig.with_probe`)."""
        return SlotRecord(
            layout=self.layout,
            num_features=self.num_features,
            input_shape=self.input_shape,
            feeder=self.feeder,
            original=self.original if self.original is not None else self.keep_choice().base,
        )


def _matches(name: str, patterns: SlotPatterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass
class _Found:
    """A norm module of the model, before the probe: its names and what its class says."""

    module: nn.Module
    names: list[str]
    kind: str
    default_layout: str
    num_features: int
    extra: tuple[str, ...] | None
    eps: float | None = None
    weight_offset: float = 0.0
    ambiguous: bool = False


def _warn_near_misses(near: list[tuple[str, nn.Module]]) -> None:
    if not near:
        return
    shown = ", ".join(f"{name} ({type(m).__qualname__})" for name, m in near[:10])
    warnings.warn(
        f"{len(near)} module(s) look like norms but compute no RMSNorm/LayerNorm/frozen "
        f"BatchNorm with their own eps, so they are not slots: {shown}"
        f"{' ...' if len(near) > 10 else ''}; declare them with autonorm.register_slot_type "
        "if they are norms",
        stacklevel=4,  # find_slots' caller
    )


def _norm_modules(model: nn.Module) -> dict[int, _Found]:
    """The model's norm modules by id, in ``named_modules()`` order (a shared module once)."""
    found: dict[int, _Found] = {}
    near: list[tuple[str, nn.Module]] = []  # norm-like modules that reproduce nothing
    inside: set[str] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        parts = name.split(".")
        if name and (
            "" in inside or any(".".join(parts[:i]) in inside for i in range(1, len(parts)))
        ):
            continue  # children of a slot (a fused norm's activation) are not slots
        key = id(module)
        if key in found:
            found[key].names.append(name)
            inside.add(name)
            continue
        info = class_reading(module)
        if info is None:
            info = library_reading(module)
        if info is None:
            if norm_like(module):
                near.append((name, module))
            continue
        if info.num_features is None:
            warnings.warn(
                f"{name or type(module).__name__}: {type(module).__name__} normalizes over several "
                "dimensions (normalized_shape has more than one entry); it is not treated as a slot",
                stacklevel=3,  # find_slots' caller
            )
            continue
        found[key] = _Found(
            module,
            [name],
            info.kind,
            info.layout,
            info.num_features,
            info.extra,
            info.eps,
            info.weight_offset,
            info.ambiguous,
        )
        inside.add(name)
    _warn_near_misses(near)
    return found


def _selected(
    names: Sequence[str],
    include: SlotPatterns,
    exclude: SlotPatterns,
) -> bool:
    return (include is None or any(_matches(n, include) for n in names)) and not any(
        _matches(n, exclude) for n in names
    )


def select_slots(
    slots: Sequence[Slot],
    include: SlotPatterns = None,
    exclude: SlotPatterns = None,
) -> list[Slot]:
    """The slots that the glob patterns ``include`` / ``exclude`` select (as :func:`find_slots`
    selects them): a slot is selected when one of its names matches ``include`` (or
    ``include`` is None) and none matches ``exclude``."""
    return [s for s in slots if _selected(s.names, include, exclude)]


def _record_of(found: _Found, records: Mapping[str, SlotRecord] | None) -> SlotRecord | None:
    """The config's record of a slot, when it names the slot and has its channel count."""
    for name in found.names:
        record = (records or {}).get(name)
        if record is not None and record.num_features == found.num_features:
            return record
    return None


def _unsettled(module: nn.Module, kind: str) -> str:
    return (
        f"its layout is not settled: {type(module).__qualname__} computes {kind} over "
        "channels-first and channels-last inputs alike (by their rank) and no probe saw its "
        "input; give an example input (example_input= or the model's example_input_array) "
        "or a config recording a probe's findings (NormConfig.with_probe)"
    )


def _make_slot(
    model: nn.Module,
    key: int,
    found: _Found,
    probed: Probe | None,
    custom: bool,
    feeders: tuple[dict[str, str | None], dict[str, str]],
    record: SlotRecord | None,
    activations: tuple[dict[str, str], dict[int, int]],
) -> Slot:
    """The :class:`Slot` of one norm module, from its class, the probe (else the config's
    record of it) and its feeder."""
    module, names = found.module, found.names
    shape = probed.shapes.get(key) if probed is not None else None
    # a class's own layout settles it, unless its forward reproduces under both
    settled = shape is not None or not (found.ambiguous or custom)
    if shape is None and record is not None:
        layouts, shape, settled = [record.layout], record.input_shape, True
    else:
        layouts = layouts_from_shape(shape, found.num_features, found.default_layout)
    layout = layouts[0]
    keep = keep_choice_of(module, found.kind, eps=found.eps)
    declared, tagged = feeders
    feeder = feeder_of(model, names, int(found.num_features), key, probed, declared, tagged)
    if record is not None and probed is None and not any(n in declared for n in names):
        feeder = recorded_feeder(model, record.feeder, int(found.num_features))
    if feeder is not None:
        keep = keep.with_weight(weight_norm_of(model.get_submodule(feeder)))
    extra, why = found.extra, None
    if extra is None and custom:
        io = probed.io.get(key) if probed is not None else None
        children = tuple(n for n, _ in module.named_children())
        fits = custom_layouts(
            module, keep, layouts, found.num_features, io, children, found.weight_offset
        )
        if fits:
            layout, extra, settled = fits[0], children, settled or len(fits) == 1
        else:
            why = refusal(module, found.kind, io is not None)
    elif extra is None:
        extra = ()
    activation = activation_of(model, names, extra if why is None else None, *activations)
    return Slot(
        name=names[0],
        kind=found.kind,
        num_features=int(found.num_features),
        layout=layout,
        input_shape=shape,
        module_class=f"{type(module).__module__}.{type(module).__qualname__}",
        aliases=tuple(names[1:]),
        extra=extra if why is None else None,
        reached=None if probed is None else key in probed.shapes,
        feeder=feeder,
        weight_offset=found.weight_offset,
        activation=activation,
        activation_held=held(model, activation),
        keep=keep,
        refusal=why,
        original=None if record is None else record.original,
        unsettled=None if settled or why is not None else _unsettled(module, found.kind),
    )


def find_slots(
    model: nn.Module,
    example_input: Any = None,
    *,
    include: SlotPatterns = None,
    exclude: SlotPatterns = None,
    probe: bool = True,
    feeders: Mapping[str, str | None] | None = None,
    records: Mapping[str, SlotRecord] | None = None,
    activations: Mapping[str, str] | None = None,
) -> list[Slot]:
    """The norm slots of ``model``, in ``named_modules()`` order.

    Args:
        model: any ``nn.Module`` (a LightningModule included).
        example_input: input for one probe forward pass (a tensor, a tuple of positional
            arguments or a dict of keyword arguments). Default: the model's
            ``example_input_array`` when it has one. Without an input, layouts come from the
            classes (for a subclass with its own forward, from a check on random inputs) and
            ``input_shape`` is None.
        include: glob patterns on slot names; only matching slots are returned.
        exclude: glob patterns on slot names; matching slots are left out.
        probe: run the probe forward pass when an input is available (False: classes only).
        feeders: ``{slot name: layer name or None}`` declaring the Conv/Linear layer that feeds
            a slot where the probe cannot see it (None: the slot has no feeder). Default: the
            model's ``autonorm_feeders`` attribute, when it has one. Otherwise a slot's feeder
            is found by the probe; without one, from a weight-side normalization autonorm
            applied before, or from an ``nn.Sequential`` running a Conv/Linear right before it.
        records: ``{slot name: SlotRecord}``, what an earlier probe found (a config's
            :attr:`NormConfig.probe`): where no probe reaches a slot, its layout, input shape,
            feeder and original layer come from its record. A slot whose layout neither
            settles is :attr:`Slot.unsettled`, and a rewrite of it is refused.
        activations: ``{slot name: module name}`` declaring the activation right after a slot
            where surgery cannot see it (default: the model's ``autonorm_activations``
            attribute); otherwise a fused module's activation child or the next module of an
            ``nn.Sequential`` (:attr:`Slot.activation`).

    Returns:
        One :class:`Slot` per norm module (a module shared at several places is one slot).

    Raises:
        AutoNormError: a declared feeder that is not a Conv/Linear layer of the model with the
            slot's channel count, or that names no slot.
        ProbeError: the probe forward pass failed.

    Example::

        >>> import torch
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> [(s.name, s.kind, s.layout) for s in find_slots(model, torch.zeros(2, 3, 8, 8))]
        [('1', 'batchnorm', 'channels_first')]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if not probe:
        example_input = None
    found = _norm_modules(model)
    if feeders is None:
        feeders = getattr(model, FEEDERS_ATTR, None)
    channels = {name: f.num_features for f in found.values() for name in f.names}
    declared = declared_feeders(model, feeders, channels)
    found = {k: f for k, f in found.items() if _selected(f.names, include, exclude)}
    custom = {k for k, f in found.items() if f.extra is None and not _native_forward(f.module)}
    feeder_modules = {
        id(m): (m, name) for name, m in model.named_modules() if name and is_feeder(m)
    }
    probed = None
    if example_input is not None and found:
        modules = {k: f.module for k, f in found.items()}
        probed = run_probe(model, modules, example_input, custom, feeders=feeder_modules)
    tagged = tagged_feeders(feeder_modules)
    if activations is None:
        activations = getattr(model, ACTIVATIONS_ATTR, None)
    uses = module_uses(model)
    activation_info = (declared_activations(model, activations, list(channels), uses), uses)
    slots = [
        _make_slot(
            model,
            key,
            f,
            probed,
            key in custom,
            (declared, tagged),
            _record_of(f, records),
            activation_info,
        )
        for key, f in found.items()
    ]
    unreached = [s.name for s in slots if s.reached is False]
    if unreached:
        warnings.warn(
            f"the probe forward pass did not reach {len(unreached)} norm slot(s): {unreached[:10]}"
            f"{' ...' if len(unreached) > 10 else ''}; their layouts come from their classes",
            stacklevel=2,
        )
    return slots
