"""A config and learned mixing weights in terms of a space.

:func:`params_for` gives the trial parameters that reproduce a config (a learned or recommended
one, a baseline) as closely as a space allows. :func:`narrow_space` drops from each slot's
choices those a learned SwitchableNorm mix weighed little: one short learn pass then steers
the search, which spends its trials on what the gradient already found plausible. Choices that
mix no SN statistic (switchable, dyt, identity) and the slot's own layer are never dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from autonorm.config import NormChoice, NormConfig
from autonorm.norms import MixingWeights
from autonorm.search_spaces._space import Parameter, SearchSpace
from autonorm.surgery import Slot, candidate_scores, family


def narrow_space(
    space: SearchSpace,
    slots: Sequence[Slot],
    learned: Mapping[str, MixingWeights],
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
    narrowed: dict[str, list[Any]] = {}
    for slot in slots:
        offered = space.choices_for(slot)
        if slot.name not in learned:
            continue
        scores = candidate_scores(learned[slot.name])
        best = max(scores.values())
        kept = [
            c
            for c in offered
            if c == slot.keep_choice()
            or family(c, slot.layout) not in scores
            or scores[family(c, slot.layout)] >= keep_ratio * best  # type: ignore[index]
        ]
        narrowed[_literal(slot.name)] = [c.to_value() for c in kept]
    return dataclasses.replace(space, choices=narrowed, identity=False, keep=False)


def _literal(name: str) -> str:
    """A glob pattern matching exactly ``name`` (brackets escape fnmatch's special characters)."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def params_for(
    config: NormConfig,
    slots: Sequence[Slot],
    params: Mapping[str, Parameter],
    *,
    partial: bool = False,
) -> dict[str, str] | None:
    """Trial parameters reproducing ``config`` as closely as the space allows.

    Each parameter takes the config's choice when the space offers it, else the first offered
    choice of the same SN family; None when some parameter has neither (``partial``: that
    parameter is left out instead).
    """
    by_name = {s.name: s for s in slots}
    chosen: dict[str, str] = {}
    for param, (labels, names) in params.items():
        slot = by_name[names[0]]
        wanted = config.choices.get(slot.name)
        if wanted is None:
            if partial:
                continue
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
            if partial:
                continue
            return None
        chosen[param] = match
    return chosen
