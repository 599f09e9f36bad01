"""Search spaces: which norm choices each slot may take.

A :class:`SearchSpace` starts from a preset (a function of the slot) and applies the user's
``choices`` (``{glob pattern on slot names: [choice, ...]}``, first matching pattern wins), which
replace a slot's preset choices. Choices invalid for
a slot (groups not dividing C, instancenorm without positions, a weight-side part without a
feeder, ...) are removed per slot with :meth:`autonorm.Slot.check`, so that every choice Optuna
proposes can be applied.

Two options widen the presets: ``weight_norms=True`` adds weight-side pairs (``groupnorm+ws``,
``batchnorm+ws``, ``identity+wn``) where a slot has a feeder, and ``devices > 1`` (from the
budget, :meth:`SearchSpace.for_budget`) adds ``syncbatchnorm`` next to ``batchnorm``.
``small_batch=True`` (a per-device batch under 16 in the budget) adds the small-batch family:
``batchrenorm`` after the batch norms, and ``frn`` and ``evonorm_s0`` to channels-first slots
(they include their activation: offered where the slot has one, and the log says why not
elsewhere).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from autonorm._errors import ConfigError
from autonorm._io import load_yaml
from autonorm.norms import CHANNELS_FIRST, NORM_NAMES, default_groups, get_spec, group_counts

if TYPE_CHECKING:
    from autonorm.budget import Budget
    from autonorm.config import NormChoice
    from autonorm.surgery import Slot

log = logging.getLogger(__name__)

TIE_MODES = ("none", "stage", "all")
TIE_PREFIX = "tie:"
#: Norm choices that ``weight_norms=True`` pairs with weight standardization (Qiao et al. 2019
#: pair WS with group and batch norm).
WS_PARTNERS = ("groupnorm", "batchnorm", "syncbatchnorm")


#: How many GroupNorm group counts a preset offers a slot.
GROUP_COUNTS_OFFERED = 3


def _input_ndim(slot: Slot) -> int | None:
    return None if slot.input_shape is None else len(slot.input_shape)


def _offered_groups(slot: Slot) -> list[int]:
    """A few group counts for a slot from :func:`~autonorm.norms.group_counts`: its default
    first, then each valid count at most half the one before, so that the offered group sizes
    are a factor of 2 or more apart (64 channels: 16, 8, 4)."""
    offered: list[int] = []
    for groups in group_counts(slot.num_features, input_ndim=_input_ndim(slot)):
        if not offered or 2 * groups <= offered[-1]:
            offered.append(groups)
    return offered[:GROUP_COUNTS_OFFERED]


def _groupnorms(slot: Slot) -> list[dict[str, Any]]:
    return [{"name": "groupnorm", "groups": g} for g in _offered_groups(slot)]


def _auto(slot: Slot) -> list[Any]:
    if slot.layout == CHANNELS_FIRST:
        return [
            "batchnorm",
            *_groupnorms(slot),
            "instancenorm",
            "layernorm",
            "rmsnorm",
            "switchable",
        ]
    return ["layernorm", "rmsnorm", "dyt", "switchable", "batchnorm"]


def _cnn(slot: Slot) -> list[Any]:
    if slot.layout == CHANNELS_FIRST:
        return ["batchnorm", *_groupnorms(slot), "instancenorm", "layernorm", "switchable"]
    return ["layernorm", "batchnorm", "rmsnorm"]


def _transformer(slot: Slot) -> list[Any]:
    if slot.layout == CHANNELS_FIRST:
        return ["layernorm", "rmsnorm", *_groupnorms(slot), "batchnorm"]
    return ["layernorm", "rmsnorm", "dyt"]


def _minimal(slot: Slot) -> list[Any]:
    return [
        slot.keep_choice(),
        {
            "name": "groupnorm",
            "groups": default_groups(slot.num_features, input_ndim=_input_ndim(slot)),
        },
        "layernorm",
    ]


def small_batch_choices(slot: Slot, choices: list[Any]) -> list[Any]:
    """A preset's ``choices`` for ``slot`` with the small-batch family: ``batchrenorm`` after
    the batch norms (Ioffe 2017), and on a channels-first slot ``frn`` (Singh & Krishnan 2020)
    and ``evonorm_s0`` (Liu et al. 2020), which replace the activation after the slot too."""
    out = list(choices)
    batch = [c for c in ("syncbatchnorm", "batchnorm") if c in out]
    if batch:
        out.insert(out.index(batch[0]) + 1, "batchrenorm")
    if slot.layout == CHANNELS_FIRST:
        out += ["frn", "evonorm_s0"]
    return out


#: Preset name -> function of a slot giving its choices (before validity filtering).
PRESETS: dict[str, Callable[[Slot], list[Any]]] = {
    "auto": _auto,
    "cnn": _cnn,
    "transformer": _transformer,
    "minimal": _minimal,
}


class Parameter(NamedTuple):
    """One Optuna parameter of a space: the choice labels it offers and the slots it decides
    (one slot, or a tied group)."""

    labels: list[str]
    slots: list[str]


#: ``{parameter name: Parameter}``: what a space asks of a trial for a model's slots.
Parameters = dict[str, Parameter]


@dataclass(frozen=True)
class PatternChoices:
    """One entry of a space's ``choices``: the choices of the slots whose name matches
    ``pattern`` (fnmatch glob)."""

    pattern: str
    choices: tuple[NormChoice, ...]


@dataclass
class SearchSpace:
    """Per-slot norm choices for a search.

    Args:
        preset: name of a preset in :data:`PRESETS` giving every slot's default choices.
        choices: ``{glob pattern: [choice, ...]}`` replacing the preset's choices for matching
            slots (first matching pattern wins; the ``choices`` key of a space file), or a bare
            list for every slot (pattern ``*``). A choice is a registry name, a
            ``{"name": ..., **params}`` dict or a :class:`~autonorm.config.NormChoice`.
        identity: also offer ``identity`` (no normalization) to every slot.
        keep: also offer every slot its own original layer (the "own norms" baseline).
        tie: ``"none"``; ``"stage"`` (slots under the same top-level module share one choice);
            ``"all"`` (one choice for the whole model).
        weight_norms: also offer weight-side pairs to slots with a feeder: each groupnorm /
            batchnorm / syncbatchnorm choice with ``+ws``, and ``identity+wn``.
        devices: how many devices the final training uses; with more than one, the presets
            offer ``syncbatchnorm`` after ``batchnorm`` (see :meth:`for_budget`).
        small_batch: the presets also offer the small-batch family (:func:`small_batch_choices`;
            set by :meth:`for_budget` where the per-device batch is under 16).

    Example::

        >>> space = SearchSpace("cnn", choices={"head.*": ["layernorm"]}, tie="none")
        >>> space.preset
        'cnn'
    """

    preset: str = "auto"
    choices: Mapping[str, Sequence[Any]] | None = None
    identity: bool = False
    tie: str = "none"
    keep: bool = True
    weight_norms: bool = False
    devices: int = 1
    small_batch: bool = False
    _patterns: tuple[PatternChoices, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from autonorm.config import NormChoice

        problems = []
        if self.preset not in PRESETS:
            problems.append(f"unknown preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        if self.tie not in TIE_MODES:
            problems.append(f"`tie` must be one of {TIE_MODES}, got {self.tie!r}")
        for flag in ("weight_norms", "small_batch"):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"`{flag}` must be true or false, got {getattr(self, flag)!r}")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            problems.append(f"`devices` must be a positive int, got {self.devices!r}")
        if isinstance(self.choices, (list, tuple)):  # a bare list: every slot
            self.choices = {"*": list(self.choices)}
        if self.choices is not None and not isinstance(self.choices, Mapping):
            problems.append(
                f"`choices` must map slot patterns to lists of choices, got {self.choices!r}"
            )
        patterns = []
        for pattern, values in (self.choices if isinstance(self.choices, Mapping) else {}).items():
            if isinstance(values, (str, Mapping)) or not isinstance(values, Iterable):
                values = [values]
            parsed = []
            for value in values:
                try:
                    parsed.append(NormChoice.parse(value))
                except ValueError as err:
                    problems.append(f"choices for {pattern!r}: {err}")
            if not parsed:
                problems.append(f"choices for {pattern!r}: none given")
            patterns.append(PatternChoices(str(pattern), tuple(parsed)))
        if problems:
            raise ConfigError("invalid search space:\n  " + "\n  ".join(problems))
        self._patterns = tuple(patterns)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "search space") -> SearchSpace:
        """Build from ``{"preset": ..., "choices": {pattern: [...]}, "identity": bool, "tie": ...,
        "keep": bool, "weight_norms": bool, "devices": int, "small_batch": bool}``.

        A bare list under ``choices`` applies to every slot (pattern ``*``).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
        known = {
            "preset",
            "choices",
            "identity",
            "tie",
            "keep",
            "weight_norms",
            "devices",
            "small_batch",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; valid keys: {sorted(known)}")
        choices = data.get("choices")
        identity = data.get("identity", False)
        if not isinstance(identity, bool):
            raise ConfigError(f"{source}: `identity` must be true or false, got {identity!r}")
        try:
            return cls(
                preset=data.get("preset", "auto"),
                choices=choices,
                identity=identity,
                tie=data.get("tie", "none"),
                keep=bool(data.get("keep", True)),
                weight_norms=data.get("weight_norms", False),
                devices=data.get("devices", 1),
                small_batch=data.get("small_batch", False),
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> SearchSpace:
        """Load a space from a YAML file (safe loading)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(
                f"cannot read search space file {str(path)!r}: {err.strerror}"
            ) from None
        data = load_yaml(text, f"search space file {str(path)!r}")  # no aliases, no duplicated key
        return cls.from_dict(data or {}, source=f"search space file {str(path)!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-value description (for metadata and study attributes); ``small_batch`` only
        where set, so that the description of an earlier space stays what it was."""
        out = {
            "preset": self.preset,
            "choices": {p.pattern: [c.to_value() for c in p.choices] for p in self._patterns},
            "identity": self.identity,
            "tie": self.tie,
            "keep": self.keep,
            "weight_norms": self.weight_norms,
            "devices": self.devices,
        }
        if self.small_batch:
            out["small_batch"] = True
        return out

    def for_budget(self, budget: Budget | None) -> SearchSpace:
        """This space for a run under ``budget``: its ``devices`` taken from the budget, and
        the small-batch family offered where the per-device batch is under 16
        (:attr:`autonorm.Budget.small_batch`).

        Example::

            >>> from autonorm.budget import Budget
            >>> space = SearchSpace("cnn").for_budget(Budget(batch_size=2, devices=4))
            >>> space.devices, space.small_batch
            (4, True)
        """
        if budget is None:
            return self
        small_batch = self.small_batch or budget.small_batch
        if (budget.devices, small_batch) == (self.devices, self.small_batch):
            return self
        return dataclasses.replace(self, devices=budget.devices, small_batch=small_batch)

    # -- per-slot choices ----------------------------------------------------------------------

    def unchecked_choices(self, slot: Slot) -> list[NormChoice]:
        """The slot's choices before validity filtering."""
        from autonorm.config import NormChoice

        for entry in self._patterns:
            if fnmatch.fnmatchcase(slot.name, entry.pattern):
                raw: list[Any] = list(entry.choices)
                break
        else:
            raw = PRESETS[self.preset](slot)
            if self.devices > 1 and "batchnorm" in raw:  # a preset's choices are plain names
                raw.insert(raw.index("batchnorm") + 1, "syncbatchnorm")
            if self.small_batch:
                raw = small_batch_choices(slot, raw)
        if self.identity:
            raw.append("identity")
        out: list[NormChoice] = []
        for value in raw:
            choice = NormChoice.parse(value)
            if choice not in out:
                out.append(choice)
        if self.weight_norms and slot.feeder is not None:
            pairs = [c.with_weight("ws") for c in out if c.name in WS_PARTNERS and not c.weight]
            pairs.append(NormChoice("identity", weight="wn"))
            out += [c for c in pairs if c not in out]
        if self.keep and slot.keep_choice() not in out:
            out.append(slot.keep_choice())
        return out

    def choices_for(self, slot: Slot) -> list[NormChoice]:
        """The slot's valid choices, in the space's order.

        Raises:
            ConfigError: no choice of the space is valid for the slot (with the reasons).
        """
        valid: list[tuple[NormChoice, list[str]]] = []
        rejected: list[tuple[NormChoice, list[str]]] = []
        for choice in self.unchecked_choices(slot):
            problems = slot.check(choice)
            (rejected if problems else valid).append((choice, problems))
        for choice, problems in rejected:
            if get_spec(choice.name).activation if choice.name in NORM_NAMES else False:
                log.info("slot %r: %s is not offered: %s", slot.name, choice.label, problems[0])
        if not valid:
            reasons = "; ".join(f"{c.label}: {p[0]}" for c, p in rejected)
            raise ConfigError(
                f"slot {slot.name!r}: no valid choice in the search space ({reasons})"
            )
        return [c for c, _ in valid]

    def resolve(self, slots: Sequence[Slot]) -> dict[str, list[NormChoice]]:
        """Valid choices of every slot, collecting all slots without a valid choice in one error."""
        out, problems = {}, []
        for slot in slots:
            try:
                out[slot.name] = self.choices_for(slot)
            except ConfigError as err:
                problems.append(str(err))
        if problems:
            raise ConfigError("search space does not fit the model:\n  " + "\n  ".join(problems))
        return out

    def parameters(self, slots: Sequence[Slot]) -> Parameters:
        """Optuna parameters of the space: ``{param name: (choice labels, slot names)}``.

        Without tying every slot is its own parameter, named by the slot. With tying, a group's
        parameter is ``"tie:<group>"`` and offers the choices valid for all its slots.
        """
        per_slot = self.resolve(slots)
        groups: dict[str, list[str]] = {}
        for slot in slots:
            groups.setdefault(self.group_of(slot.name), []).append(slot.name)
        params: Parameters = {}
        for group, names in groups.items():
            if self.tie == "none":
                params[group] = Parameter([c.label for c in per_slot[group]], names)
                continue
            common = [c.label for c in per_slot[names[0]]]
            for name in names[1:]:
                allowed = {c.label for c in per_slot[name]}
                common = [label for label in common if label in allowed]
            if not common:
                raise ConfigError(
                    f"tied slots {names} have no choice in common; use tie='none' or widen the space"
                )
            params[group] = Parameter(common, names)
        return params

    def group_of(self, slot_name: str) -> str:
        """The Optuna parameter name that decides ``slot_name``."""
        if self.tie == "none":
            return slot_name
        if self.tie == "all":
            return TIE_PREFIX + "all"
        return TIE_PREFIX + slot_name.split(".")[0]


def resolve_space(
    space: str | os.PathLike[str] | Mapping[str, Any] | SearchSpace | None,
) -> SearchSpace:
    """A :class:`SearchSpace` from a preset name, a YAML path, a dict or a space.

    Raises:
        ConfigError: unknown preset, missing/malformed file, invalid choices.
    """
    if space is None:
        return SearchSpace()
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, Mapping):
        return SearchSpace.from_dict(space)
    text = os.fspath(space)
    if text in PRESETS:
        return SearchSpace(text)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return SearchSpace.from_yaml(text)
    raise ConfigError(
        f"unknown search space {text!r}: give a preset ({', '.join(PRESETS)}) or a YAML file"
    )
