"""Property tests (hypothesis) of norm configs: any valid :class:`NormConfig` (slot names, every
registry choice with valid parameters and a weight-side part, plain metadata) round-trips
through ``to_dict``/``from_dict``, JSON and YAML files and each choice's label to an equal config,
and a valid config for a small model's slots applies: every slot then holds the layer the
registry builds for its choice, the feeders carry the weight-side parts, a forward pass has the
right shape, and the config read back from its file applies to a fresh model without an example
input (from its probe records) exactly as to one with it."""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import autonorm
from autonorm import NORM_NAMES, NormChoice, NormConfig
from autonorm.norms import (
    SWITCHABLE_CANDIDATES,
    SWITCHABLE_MIXINGS,
    WEIGHT_NAMES,
    create_norm,
    get_spec,
    weight_norm_of,
)

LAYOUTS = tuple(SWITCHABLE_CANDIDATES)
#: Metadata keys that a config reads (probe records, learned weights, the model class).
RESERVED_METADATA = ("probe", "weights", "mixing", "model_class")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- strategies ----------------------------------------------------------------------------------

#: Any finite float > 0 (subnormals and huge values included) or a positive int.
ANY_EPS = st.one_of(
    st.floats(min_value=0.0, exclude_min=True, allow_infinity=False, allow_nan=False),
    st.integers(1, 10),
)
#: eps values a float32 layer computes with.
SMALL_EPS = st.one_of(st.sampled_from([1e-5, 1e-3, 0.1, 1]), st.floats(1e-8, 1.0))
ANY_FINITE = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-5, 5))
MOMENTUM = st.one_of(st.none(), st.floats(0.0, 1.0), st.sampled_from([0, 1]))


@st.composite
def choices(
    draw: st.DrawFn,
    *,
    channels: int | None = None,
    layout: str | None = None,
    positions: int | None = None,
    with_weight: bool = True,
) -> NormChoice:
    """A valid choice; for a slot of ``channels`` channels in ``layout`` with ``positions``
    positions per (sample, channel) when given (groups dividing the channels, candidates of
    the layout, instance norm only with positions, parameter values a float32 layer computes
    with), else with any valid parameter values."""
    for_slot = channels is not None
    names = [
        n
        for n in NORM_NAMES
        if not (for_slot and get_spec(n).needs_positions and (positions or 0) <= 1)
    ]
    name = draw(st.sampled_from(names))
    spec = get_spec(name)
    params: dict[str, Any] = {}

    def maybe(key: str, strategy: st.SearchStrategy[Any]) -> None:
        if draw(st.booleans()):
            params[key] = draw(strategy)

    maybe("eps", SMALL_EPS if for_slot else ANY_EPS)
    maybe("affine", st.booleans())
    if "momentum" in spec.params:
        maybe("momentum", MOMENTUM)
    if "track_running_stats" in spec.params:
        maybe("track_running_stats", st.booleans())
    if "groups" in spec.params:
        if for_slot:
            divisors = [d for d in range(1, channels + 1) if channels % d == 0]
            maybe("groups", st.sampled_from(divisors))
        else:
            maybe("groups", st.one_of(st.none(), st.integers(1, 2**40)))
    if "candidates" in spec.params:
        allowed = SWITCHABLE_CANDIDATES[layout or draw(st.sampled_from(LAYOUTS))]
        maybe("candidates", st.permutations(allowed).flatmap(_nonempty_prefixes))
    if "mixing" in spec.params:
        maybe("mixing", st.sampled_from(SWITCHABLE_MIXINGS))
    if "alpha_init" in spec.params:
        maybe("alpha_init", st.floats(-4.0, 4.0) if for_slot else ANY_FINITE)
    weight = draw(st.sampled_from([None, *WEIGHT_NAMES])) if with_weight else None
    return NormChoice(name, params, weight)


def _nonempty_prefixes(order: list[str]) -> st.SearchStrategy[tuple[str, ...]]:
    return st.integers(1, len(order)).map(lambda k: tuple(order[:k]))


#: Plain (YAML/JSON) metadata values.
PLAIN = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
METADATA = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k not in RESERVED_METADATA), PLAIN, max_size=4
)
#: Slot names: module paths, the root ("") and, since a config takes any string, any text.
SLOT_NAMES = st.one_of(
    st.from_regex(r"[a-z_][a-z0-9_]{0,6}(\.[a-z0-9_]{1,6}){0,3}", fullmatch=True),
    st.just(""),
    st.text(max_size=12),
)


@st.composite
def configs(draw: st.DrawFn) -> NormConfig:
    slots = draw(st.lists(SLOT_NAMES, max_size=6, unique=True))
    chosen = {slot: draw(choices()) for slot in slots}
    # each choice in one of the forms a file or a user writes: choice, label or plain value
    forms = [draw(st.sampled_from(["choice", "label", "value"])) for _ in chosen]
    written = {
        slot: {"choice": c, "label": c.label, "value": c.to_value()}[form]
        for (slot, c), form in zip(chosen.items(), forms, strict=True)
    }
    return NormConfig(written, metadata=draw(METADATA))


# -- round trips ---------------------------------------------------------------------------------


def _same(loaded: NormConfig, config: NormConfig) -> None:
    assert loaded == config
    assert list(loaded) == list(config)  # the slots' order too
    for slot in config:
        assert loaded[slot].label == config[slot].label
        assert loaded[slot].weight == config[slot].weight
    assert loaded.metadata == config.metadata


@settings(max_examples=100)
@given(config=configs())
def test_a_valid_config_round_trips_through_dicts_json_and_yaml(config):
    data = config.to_dict()
    _same(NormConfig.from_dict(data), config)
    _same(NormConfig.from_dict(json.loads(json.dumps(data))), config)
    _same(NormConfig.from_dict(yaml.safe_load(yaml.safe_dump(data, sort_keys=False))), config)
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".yaml", ".yml", ".json"):
            path = config.save(Path(folder) / f"config{suffix}")
            _same(NormConfig.load(path), config)
            # and what was read writes the same file again
            text = path.read_text()
            NormConfig.load(path).save(path)
            assert path.read_text() == text


@settings(max_examples=200)
@given(choice=choices())
def test_a_choice_round_trips_through_its_label_and_value(choice):
    for form in (choice.label, choice.to_value(), choice):
        parsed = NormChoice.parse(form)
        assert parsed == choice and hash(parsed) == hash(choice)
        assert parsed.label == choice.label and parsed.weight == choice.weight
    assert NormChoice.parse(json.loads(json.dumps(choice.to_value()))) == choice
    assert NormChoice.parse(yaml.safe_load(yaml.safe_dump(choice.to_value()))) == choice
    assert choice.base.weight is None and choice.base.with_weight(choice.weight) == choice


# -- applying ------------------------------------------------------------------------------------


@st.composite
def models(draw: st.DrawFn) -> dict[str, Any]:
    """A small model as a spec: ``cnn`` (Conv2d + BatchNorm2d blocks, optionally a Linear +
    BatchNorm1d head on ``(N, C)``) or ``tokens`` (Linear + LayerNorm blocks on ``(N, L, C)``),
    with channel counts that have several divisors."""
    family = draw(st.sampled_from(["cnn", "tokens"]))
    widths = draw(st.lists(st.sampled_from([4, 6, 8, 12]), min_size=1, max_size=3))
    batch = draw(st.integers(2, 3))
    size = draw(st.integers(1, 4))  # height and width, or tokens
    head = draw(st.sampled_from([None, 4, 8])) if family == "cnn" else None
    return {"family": family, "widths": widths, "batch": batch, "size": size, "head": head}


def _build_model(spec: dict[str, Any], seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    size, c_in = spec["size"], 3
    for width in spec["widths"]:
        if spec["family"] == "cnn":
            layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        else:
            layers += [nn.Linear(c_in, width), nn.LayerNorm(width), nn.GELU()]
        c_in = width
    if spec["head"]:
        layers += [nn.Flatten(), nn.Linear(c_in * size * size, spec["head"])]
        layers += [nn.BatchNorm1d(spec["head"])]
    shape = (spec["batch"], 3, size, size) if spec["family"] == "cnn" else (spec["batch"], size, 3)
    return nn.Sequential(*layers), torch.randn(shape)


def _output_shape(spec: dict[str, Any]) -> tuple[int, ...]:
    n, size, width = spec["batch"], spec["size"], spec["widths"][-1]
    if spec["head"]:
        return (n, spec["head"])
    return (n, width, size, size) if spec["family"] == "cnn" else (n, size, width)


def _apply(model: nn.Module, config: NormConfig, x: torch.Tensor | None) -> nn.Module:
    with warnings.catch_warnings():  # parameters without a place in the new layer are dropped
        warnings.filterwarnings("ignore", "the new layers have no place", UserWarning)
        return autonorm.apply_config(model, config, example_input=x)


@settings(max_examples=60)
@given(spec=models(), data=st.data())
def test_a_valid_config_for_a_models_slots_round_trips_and_applies(spec, data, tmp_path):
    model, x = _build_model(spec, seed=0)
    slots = autonorm.find_slots(model, x)
    assert len(slots) == len(spec["widths"]) + bool(spec["head"])
    chosen = {}
    for slot in slots:
        positions = math.prod(slot.input_shape) // (slot.input_shape[0] * slot.num_features)
        strategy = choices(channels=slot.num_features, layout=slot.layout, positions=positions)
        chosen[slot.name] = data.draw(strategy, label=f"slot {slot.name}")
        assert slot.check(chosen[slot.name]) == []
    config = NormConfig(chosen, metadata=data.draw(METADATA, label="metadata")).with_probe(slots)
    suffix = data.draw(st.sampled_from([".yaml", ".json"]), label="suffix")
    loaded = NormConfig.load(config.save(tmp_path / f"config{suffix}"))
    _same(loaded, config)

    model = _apply(model, loaded, x)
    out = model(x)
    assert out.shape == _output_shape(spec) and torch.isfinite(out).all()
    out.square().mean().backward()
    for slot in slots:
        choice = loaded[slot.name]
        layer = model.get_submodule(slot.name)
        expected = create_norm(
            choice.name,
            slot.num_features,
            layout=slot.layout,
            input_ndim=slot.input_ndim,
            **choice.params,
        )
        assert type(layer) is type(expected), slot.name
        assert repr(layer) == repr(expected), slot.name
        assert weight_norm_of(model.get_submodule(slot.feeder)) == choice.weight, slot.name

    # the file's probe records stand in for an example input: a fresh model without one ends
    # up as one given the input
    without, _ = _build_model(spec, seed=1)
    with_input, _ = _build_model(spec, seed=1)
    without = _apply(without, loaded, None)
    with_input = _apply(with_input, loaded, x)
    assert repr(without) == repr(with_input)
    state = with_input.state_dict()
    for key, value in without.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(without(x), with_input(x))
