"""Search spaces: presets (``auto``, ``cnn``, ``transformer``, ``minimal``) and user spaces."""

from __future__ import annotations

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
    "slot_groups",
]
