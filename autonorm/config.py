"""Per-slot norm configs: :class:`NormChoice` (one slot's choice) and :class:`NormConfig`.

A config maps slot names to choices and carries metadata (where it came from). It is saved as
YAML or JSON with a schema version, loaded with safe loading only, and validated on load with
every problem of the file collected into one :class:`~autonorm.ConfigError`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from autonorm._errors import ConfigError
from autonorm._io import atomic_write, load_json, load_yaml
from autonorm.norms import COMMON_PARAMS, MixingWeights, check_params, check_weight, get_spec

SCHEMA_VERSION = 1
_SUFFIXES = (".yaml", ".yml", ".json")
_LABEL = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)
#: ``<choice>+<weight part>``: the last ``+`` followed by a bare name (``1e+20`` is no match).
_WEIGHT_SUFFIX = re.compile(r"^(.*)\+\s*([A-Za-z_]\w*)\s*$", re.DOTALL)


class _Named(Protocol):
    """A slot as configs see it (:class:`~autonorm.Slot` or anything else with a name); configs
    sit below surgery and do not import it."""

    @property
    def name(self) -> str: ...


def _checked_suffix(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.suffix.lower() not in _SUFFIXES:
        raise ConfigError(f"config file must end in {', '.join(_SUFFIXES)}, got {str(path)!r}")
    return path


def plain(value: Any) -> Any:
    """``value`` with tuples turned into lists and mappings into dicts (YAML/JSON-safe)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _frozen(value: Any) -> Any:
    """Hashable form of a parameter value (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        raise ValueError(f"a choice parameter cannot be a mapping, got {value!r}")
    return value


def _split_top_level(text: str) -> list[str]:
    """Split ``a=1, b=[x, y]`` at the commas outside brackets."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if "".join(current).strip():
        parts.append("".join(current))
    return parts


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def _parse_value(raw: str) -> Any:
    """A label's parameter value: YAML scalars and lists, plus what YAML 1.1 reads as strings
    but Python writes for numbers and None (``1e-06``, ``None``)."""
    return _numbers(load_yaml(raw, f"parameter value {raw!r}"))


def _numbers(value: Any) -> Any:
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if not isinstance(value, str):
        return value
    if value == "None":
        return None
    try:
        return float(value)
    except ValueError:
        return value


#: Factory arguments of :func:`~autonorm.norms.create_norm` that a rewrite sets itself.
_PLACEMENT_PARAMS = ("device", "dtype")


@dataclass(frozen=True)
class NormChoice:
    """One slot's choice: a registry name, its parameters, and optionally a weight-side part.

    Written as a plain name (``"layernorm"``), a mapping (``{"name": "groupnorm", "groups": 8}``)
    or a label (``"groupnorm(groups=8)"``, the form Optuna stores as a categorical choice).
    The weight-side part normalizes the weight of the Conv/Linear layer feeding the slot:
    ``"ws"`` (Weight Standardization) or ``"wn"`` (Weight Normalization). It is written after a
    ``+`` in a label (``"groupnorm(groups=8)+ws"``) and under ``weight`` in a mapping.

    Example::

        >>> NormChoice.parse({"name": "groupnorm", "groups": 8}).label
        'groupnorm(groups=8)'
        >>> NormChoice.parse("groupnorm(groups=8)") == NormChoice("groupnorm", {"groups": 8})
        True
        >>> choice = NormChoice.parse("groupnorm(groups=8)+ws")
        >>> choice.weight, choice.to_value()
        ('ws', {'name': 'groupnorm', 'groups': 8, 'weight': 'ws'})
        >>> NormChoice.parse({"name": "identity", "weight": "wn"}).label
        'identity+wn'
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    weight: str | None = None

    def __post_init__(self) -> None:
        spec = get_spec(self.name)  # ValueError listing the valid names
        params = {str(k): _frozen(v) for k, v in dict(self.params).items()}
        placed = sorted(set(params) & set(_PLACEMENT_PARAMS))
        if placed:
            raise ValueError(
                f"{self.name}: {placed} are not choice parameters: a rewrite builds each layer "
                "on the device and dtype of the layer it replaces"
            )
        allowed = set(spec.params) | set(COMMON_PARAMS) - set(_PLACEMENT_PARAMS)
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ValueError(
                f"{self.name} takes parameters {sorted(allowed)}, got unknown {unknown}"
            )
        problems = check_params(params) + check_weight(self.weight)
        if problems:
            raise ValueError(f"{self.name}: " + "; ".join(problems))
        object.__setattr__(self, "params", dict(sorted(params.items())))

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.params.items()), self.weight))

    @classmethod
    def parse(cls, value: Any) -> NormChoice:
        """A choice from a name, a label, a ``{"name": ..., **params}`` mapping or a choice.

        Raises:
            ValueError: unknown name, unknown parameter, or malformed value.
        """
        if isinstance(value, NormChoice):
            return value
        if isinstance(value, Mapping):
            data = dict(value)
            name = data.pop("name", None)
            if not isinstance(name, str):
                raise ValueError(f"a choice mapping needs a `name` string, got {dict(value)!r}")
            weight = data.pop("weight", None)
            if weight is not None and not isinstance(weight, str):
                raise ValueError(f"`weight` must be 'ws' or 'wn', got {weight!r}")
            return cls(name, data, weight)
        if isinstance(value, str):
            weight = None
            suffix = _WEIGHT_SUFFIX.match(value)
            if suffix is not None:
                value, weight = suffix.group(1), suffix.group(2)
            match = _LABEL.match(value)
            if match is None:
                raise ValueError(
                    f"malformed norm choice {value!r}; expected e.g. 'groupnorm(groups=8)' or "
                    "'groupnorm(groups=8)+ws'"
                )
            name, args = match.group(1), match.group(2)
            params: dict[str, Any] = {}
            for part in _split_top_level(args or ""):
                key, sep, raw = part.partition("=")
                if not sep or not key.strip():
                    raise ValueError(
                        f"malformed parameter {part.strip()!r} in norm choice {value!r}"
                    )
                params[key.strip()] = _parse_value(raw.strip())
            return cls(name, params, weight)
        raise ValueError(f"a norm choice must be a name, a label or a mapping, got {value!r}")

    @property
    def base(self) -> NormChoice:
        """The norm-layer part alone (the choice without its weight-side part)."""
        return self if self.weight is None else NormChoice(self.name, self.params)

    def with_weight(self, weight: str | None) -> NormChoice:
        """The same norm layer with the weight-side part ``weight`` (None: none)."""
        return NormChoice(self.name, self.params, weight)

    @property
    def label(self) -> str:
        """The choice as one string: ``name`` or ``name(key=value, ...)``, then ``+ws``/``+wn``
        when it has a weight-side part."""
        label = self.name
        if self.params:
            args = ", ".join(f"{k}={_format_value(v)}" for k, v in self.params.items())
            label = f"{self.name}({args})"
        return label if self.weight is None else f"{label}+{self.weight}"

    def to_value(self) -> str | dict[str, Any]:
        """The plain form written to files: the label when there are no parameters, else a
        mapping with the parameters (and ``weight``)."""
        if not self.params:
            return self.label
        value = {"name": self.name, **plain(self.params)}
        if self.weight is not None:
            value["weight"] = self.weight
        return value

    def __str__(self) -> str:
        return self.label


#: Metadata key of the per-slot findings of a probe (:class:`SlotRecord` values).
PROBE_KEY = "probe"
#: Metadata keys of what :func:`~autonorm.derive_config` records of a learn run: each slot's
#: learned mixing weights, and how the layers mixed (``softmax`` or ``sparsestmax``).
LEARNED_WEIGHTS = "weights"
LEARNED_MIXING = "mixing"
_LAYOUTS = ("channels_first", "channels_last")


@dataclass(frozen=True)
class SlotRecord:
    """What a probe found of one slot, carried by a config so that a model rebuilt without an
    example input is read the same way (:meth:`NormConfig.with_probe`).

    Attributes:
        layout: ``"channels_first"`` or ``"channels_last"``.
        num_features: the slot's channel count (a record of another channel count is ignored).
        input_shape: the input shape the probe saw, or None.
        feeder: the Conv/Linear layer feeding the slot, or None.
        original: the choice that rebuilds the slot's layer as it was first found.
    """

    layout: str
    num_features: int
    input_shape: tuple[int, ...] | None = None
    feeder: str | None = None
    original: NormChoice | None = None

    def to_value(self) -> dict[str, Any]:
        """Plain values (YAML/JSON-safe)."""
        return {
            "layout": self.layout,
            "num_features": self.num_features,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "feeder": self.feeder,
            "original": None if self.original is None else self.original.to_value(),
        }

    @classmethod
    def from_value(cls, value: Any) -> SlotRecord:
        """Read :meth:`to_value`'s form.

        Raises:
            ValueError: a malformed record (what must hold and what was given).
        """
        if not isinstance(value, Mapping):
            raise ValueError(f"a slot record must be a mapping, got {value!r}")
        layout, features = value.get("layout"), value.get("num_features")
        if layout not in _LAYOUTS:
            raise ValueError(f"`layout` must be one of {_LAYOUTS}, got {layout!r}")
        if not isinstance(features, int) or isinstance(features, bool) or features < 1:
            raise ValueError(f"`num_features` must be a positive int, got {features!r}")
        shape = value.get("input_shape")
        if shape is not None and not (
            isinstance(shape, (list, tuple)) and all(isinstance(d, int) for d in shape)
        ):
            raise ValueError(f"`input_shape` must be a list of ints or null, got {shape!r}")
        feeder = value.get("feeder")
        if feeder is not None and not isinstance(feeder, str):
            raise ValueError(f"`feeder` must be a layer name or null, got {feeder!r}")
        original = value.get("original")
        return cls(
            layout,
            features,
            None if shape is None else tuple(shape),
            feeder,
            None if original is None else NormChoice.parse(original),
        )


class _Recorded(Protocol):
    """A slot that can say what was found of it (:class:`~autonorm.Slot`)."""

    @property
    def name(self) -> str: ...

    def record(self) -> SlotRecord: ...


class NormConfig:
    """Slot name -> :class:`NormChoice`, plus metadata (schema version, model class, source).

    Two configs are equal when they make the same choices (metadata is provenance and does not
    take part).

    Args:
        choices: ``{slot name: choice}``; a choice is anything :meth:`NormChoice.parse` accepts.
            The slot name of a model that is itself a norm layer is ``""``.
        metadata: plain values (YAML/JSON-safe): e.g. ``source``, ``trial``, ``metric``,
            ``value``, ``model_class``, ``space``.

    Raises:
        ConfigError: invalid choices (all of them named in one message).

    Example::

        >>> cfg = NormConfig({"layer1.bn": "groupnorm", "head.norm": "layernorm"})
        >>> cfg["layer1.bn"].label
        'groupnorm'
    """

    def __init__(
        self, choices: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
    ) -> None:
        if not isinstance(choices, Mapping):
            raise ConfigError(
                f"`choices` must map slot names to choices, got {type(choices).__name__}"
            )
        parsed, problems = {}, []
        for name, value in choices.items():
            if not isinstance(name, str):  # "" is allowed: the root module as a slot
                problems.append(f"slot names must be strings, got {name!r}")
                continue
            try:
                parsed[name] = NormChoice.parse(value)
            except ValueError as err:
                problems.append(f"slot {name!r}: {err}")
        if problems:
            raise ConfigError("invalid norm config:\n  " + "\n  ".join(problems))
        self.choices: dict[str, NormChoice] = parsed
        self.metadata: dict[str, Any] = plain(dict(metadata or {}))

    @classmethod
    def uniform(cls, slots: Iterable[_Named | str], name: str, **params: Any) -> NormConfig:
        """The same choice for every slot: ``name`` is a name or a label, ``params`` add to its
        parameters (what was found of :class:`~autonorm.Slot` objects
        is recorded, :meth:`with_probe`).

        Example::

            >>> NormConfig.uniform(["a", "b"], "groupnorm", groups=4)["b"].label
            'groupnorm(groups=4)'
            >>> NormConfig.uniform(["a"], "groupnorm(groups=4)+ws")["a"].label
            'groupnorm(groups=4)+ws'
        """
        choice = NormChoice.parse(name)  # a name or a label ("groupnorm+ws")
        if params:
            choice = NormChoice(choice.name, {**choice.params, **params}, choice.weight)
        slots = list(slots)
        names = [s if isinstance(s, str) else s.name for s in slots]
        config = cls(dict.fromkeys(names, choice), metadata={"source": f"uniform:{choice.label}"})
        return config.with_probe(s for s in slots if hasattr(s, "record"))  # type: ignore[misc]

    # -- what the probe found -------------------------------------------------------------------

    def with_probe(self, slots: Iterable[_Recorded]) -> NormConfig:
        """Record what was found of ``slots`` (layout, input shape, feeder, original layer) in
        the metadata, in place, so that :func:`~autonorm.apply_config` and
        :func:`~autonorm.to_switchable` read a fresh model without an example input the same
        way. Returns the config.

        Example::

            >>> import torch
            >>> from autonorm import find_slots
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8))
            >>> slots = find_slots(model, torch.zeros(2, 3, 4, 4))
            >>> NormConfig({"1": "groupnorm"}).with_probe(slots).probe["1"].input_shape
            (2, 8, 4, 4)
        """
        records = {s.name: s.record().to_value() for s in slots}
        if not records:
            return self
        self.metadata[PROBE_KEY] = plain({**self.metadata.get(PROBE_KEY, {}), **records})
        return self

    @property
    def learned_weights(self) -> dict[str, MixingWeights]:
        """Each slot's learned mixing weights, as :func:`~autonorm.derive_config` recorded them
        (empty for a config that no learn run derived).

        Raises:
            ConfigError: the recorded weights are not ``{slot: {kind: {candidate: weight}}}``.
        """
        raw = self.metadata.get(LEARNED_WEIGHTS) or {}
        try:
            return {
                str(slot): {
                    str(kind): {str(c): float(w) for c, w in per_cand.items()}
                    for kind, per_cand in per_kind.items()
                }
                for slot, per_kind in raw.items()
            }
        except (AttributeError, TypeError, ValueError):
            raise ConfigError(
                f"metadata `{LEARNED_WEIGHTS}` must map slot names to mixing weights "
                f"{{kind: {{candidate: weight}}}}, got {raw!r}"
            ) from None

    @property
    def learned_mixing(self) -> str | None:
        """How the learn run's layers mixed (``softmax``, ``sparsestmax``, or both joined by
        ``+``), or None."""
        mixing = self.metadata.get(LEARNED_MIXING)
        return None if mixing is None else str(mixing)

    @property
    def probe(self) -> dict[str, SlotRecord]:
        """``{slot name: SlotRecord}`` from the metadata (empty when none was recorded).

        Raises:
            ConfigError: malformed records (all of them named in one message).
        """
        raw = self.metadata.get(PROBE_KEY) or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"metadata `{PROBE_KEY}` must map slot names to records, got {raw!r}")
        records, problems = {}, []
        for name, value in raw.items():
            try:
                records[str(name)] = SlotRecord.from_value(value)
            except ValueError as err:
                problems.append(f"slot {name!r}: {err}")
        if problems:
            raise ConfigError(f"invalid `{PROBE_KEY}` records:\n  " + "\n  ".join(problems))
        return records

    # -- mapping protocol --------------------------------------------------------------------

    def __getitem__(self, slot_name: str) -> NormChoice:
        return self.choices[slot_name]

    def __contains__(self, slot_name: object) -> bool:
        return slot_name in self.choices

    def __iter__(self) -> Iterator[str]:
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NormConfig):
            return NotImplemented
        return self.choices == other.choices

    def __repr__(self) -> str:
        inner = ", ".join(f"{k!r}: {v.label!r}" for k, v in self.choices.items())
        return f"NormConfig({{{inner}}})"

    # -- plain values and files ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``{"schema_version": 1, "metadata": {...}, "slots": {name: value}}``."""
        return {
            "schema_version": SCHEMA_VERSION,
            "metadata": plain(self.metadata),
            "slots": {name: choice.to_value() for name, choice in self.choices.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config") -> NormConfig:
        """Build from :meth:`to_dict`'s form, naming ``source`` in every error.

        Raises:
            ConfigError: wrong schema version, missing or malformed sections, invalid choices.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source}: expected a mapping with `slots`, got {type(data).__name__}"
            )
        problems = []
        version = data.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, bool) or version != SCHEMA_VERSION:
            problems.append(f"schema_version must be {SCHEMA_VERSION}, got {version!r}")
        unknown = sorted(str(k) for k in data if k not in ("schema_version", "metadata", "slots"))
        if unknown:
            problems.append(f"unknown keys {unknown}; valid keys: metadata, schema_version, slots")
        if "slots" not in data:
            problems.append("`slots` is missing: it must map slot names to choices")
        elif not isinstance(data["slots"], Mapping):
            problems.append(f"`slots` must map slot names to choices, got {data['slots']!r}")
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            problems.append(f"`metadata` must be a mapping, got {metadata!r}")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        try:
            return cls(data["slots"], metadata=metadata)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the config as YAML (``.yaml``/``.yml``) or JSON (``.json``), atomically.

        Returns:
            The path written.
        """
        path = _checked_suffix(path)
        data = self.to_dict()
        if path.suffix.lower() == ".json":
            text = json.dumps(data, indent=2) + "\n"
        else:
            text = yaml.safe_dump(data, sort_keys=False)
        return atomic_write(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NormConfig:
        """Read a config written by :meth:`save` (safe YAML loading; JSON is YAML's subset).

        Raises:
            ConfigError: a suffix other than ``.yaml``/``.yml``/``.json``, missing or unreadable
                file, malformed YAML/JSON (or YAML with Python tags, aliases or a duplicated
                key), invalid content.
        """
        path = _checked_suffix(path)
        source = f"config file {str(path)!r}"
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read {source}: {err.strerror or err}") from None
        if path.suffix.lower() == ".json":
            data = load_json(text, source)
        else:
            data = load_yaml(text, source)
        return cls.from_dict(data, source=source)
