"""``autonorm.search_spaces``: what each slot may become. No training, no study.

What belongs here is the space: presets (``auto``, ``cnn``, ``transformer``, ``minimal``) and
user spaces (``_space``: :class:`SearchSpace`, its per-slot choices filtered by shape and budget,
tying, its Optuna :class:`Parameters`), the structure of a model's slots for moving groups of
them together (``_structure``: :func:`slot_groups`) and a config or learned mixing weights in
terms of a space (``_configs``: :func:`params_for`, :func:`narrow_space`). How a search spends
its trials over a space (the staged plan, samplers, workers) belongs to :mod:`autonorm.search`.
"""

from __future__ import annotations

from autonorm.search_spaces._configs import narrow_space, params_for
from autonorm.search_spaces._space import (
    PRESETS,
    TIE_MODES,
    Parameter,
    Parameters,
    PatternChoices,
    SearchSpace,
    resolve_space,
)
from autonorm.search_spaces._structure import slot_groups

__all__ = [
    "PRESETS",
    "Parameter",
    "Parameters",
    "TIE_MODES",
    "PatternChoices",
    "SearchSpace",
    "resolve_space",
    "narrow_space",
    "params_for",
    "slot_groups",
]
