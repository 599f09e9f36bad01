"""SN-guided warm start: one short learned-SwitchableNorm run steers the black-box search.

The learn pass turns every slot into a :class:`~autonorm.norms.SwitchableNorm` and trains it
once. Its mixing weights then (1) give a derived config that the search enqueues as one of its
first trials and (2) narrow each slot's choices: a choice whose statistics the learned mix gave
little weight is dropped from that slot's Optuna parameter, so TPE spends its trials on what the
gradient already found plausible. Choices that mix no SN statistic (switchable, dyt, identity)
and the slot's own layer are never dropped.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from autonorm.config import NormChoice, NormConfig
from autonorm.search_spaces import SearchSpace
from autonorm.slots import Slot

log = logging.getLogger(__name__)

#: A choice's registry name -> the SwitchableNorm candidate computing the closest statistics.
FAMILIES: dict[str, dict[str, str]] = {
    "channels_first": {
        "batchnorm": "batch",
        "syncbatchnorm": "batch",
        "instancenorm": "instance",
        "groupnorm": "layer",
        "layernorm": "layer",
        "rmsnorm": "layer",
    },
    "channels_last": {
        "batchnorm": "batch",
        "syncbatchnorm": "batch",
        "layernorm": "layer",
        "rmsnorm": "rms",
    },
}


def family(choice: NormChoice, layout: str) -> str | None:
    """The SN candidate whose learned weight speaks for ``choice`` (None: no such candidate)."""
    return FAMILIES[layout].get(choice.name)


def candidate_scores(weights: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of the learned mean- and variance-weights per candidate."""
    return {c: (weights["mean"][c] + weights["var"][c]) / 2 for c in weights["mean"]}


def narrow_space(
    space: SearchSpace,
    slots: Sequence[Slot],
    learned: Mapping[str, Mapping[str, Mapping[str, float]]],
    *,
    keep_ratio: float = 0.5,
) -> SearchSpace:
    """A space whose per-slot choices drop those the learned mix weighed below
    ``keep_ratio`` times its favourite candidate.

    Args:
        space: the search space to narrow (tying is kept).
        slots: the model's slots.
        learned: ``{slot name: {"mean": {candidate: w}, "var": {...}}}`` from the learn pass.
        keep_ratio: a choice stays when its candidate's score is at least this fraction of the
            best candidate's.
    """
    rules: dict[str, list[Any]] = {}
    for slot in slots:
        choices = space.choices_for(slot)
        if slot.name not in learned:
            continue
        scores = candidate_scores(learned[slot.name])
        best = max(scores.values())
        kept = [
            c
            for c in choices
            if c == slot.keep_choice()
            or family(c, slot.layout) not in scores
            or scores[family(c, slot.layout)] >= keep_ratio * best  # type: ignore[index]
        ]
        rules[_literal(slot.name)] = [c.to_value() for c in kept]
    return dataclasses.replace(space, rules=rules, identity=False, keep=False)


def _literal(name: str) -> str:
    """A glob pattern matching exactly ``name`` (brackets escape fnmatch's special characters)."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def params_for(
    config: NormConfig, slots: Sequence[Slot], params: Mapping[str, tuple[list[str], list[str]]]
) -> dict[str, str] | None:
    """Trial parameters reproducing ``config`` as closely as the space allows.

    Each parameter takes the config's choice when the space offers it, else the first offered
    choice of the same SN family; None when some parameter has neither.
    """
    by_name = {s.name: s for s in slots}
    chosen: dict[str, str] = {}
    for param, (labels, names) in params.items():
        slot = by_name[names[0]]
        wanted = config.choices.get(slot.name)
        if wanted is None:
            return None
        if wanted.label in labels:
            chosen[param] = wanted.label
            continue
        target = family(wanted, slot.layout)
        same_family = [
            (label, choice)
            for label in labels
            if target is not None
            and family(choice := NormChoice.parse(label), slot.layout) == target
        ]
        # the same weight-side part when the space offers it, else the plain choice
        match = next((label for label, c in same_family if c.weight == wanted.weight), None)
        match = match or next((label for label, c in same_family if c.weight is None), None)
        if match is None:
            return None
        chosen[param] = match
    return chosen
