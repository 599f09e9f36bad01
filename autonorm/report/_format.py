"""Values as the page, the figures and the dashboard note show them."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping

import yaml

from autonorm.budget import format_bytes
from autonorm.config import NormChoice
from autonorm.norms import NORM_NAMES, get_spec
from autonorm.report._types import STATES, StoredChoice, TrialCategory, TrialCounts


def esc(value: object) -> str:
    """``str(value)`` escaped for HTML (quotes too)."""
    return html.escape(str(value), quote=True)


def fmt(value: object) -> str:
    """A cell value: "-" for None, floats with 6 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def choice_label(value: StoredChoice) -> str:
    """The label of a stored choice (``groupnorm(groups=4)``), spelled as :class:`NormChoice`
    spells it; a value that is no valid choice (a study autonorm did not write) as it is."""
    try:
        return NormChoice.parse(value).label
    except (ValueError, yaml.YAMLError):  # YAMLError: a malformed parameter in a label
        return str(value)


def papers(*configs: Mapping[str, StoredChoice]) -> list[tuple[str, str]]:
    """``(registry name, paper)`` of each norm the configs choose, in registry order."""
    used = set()
    for config in configs:
        for value in config.values():
            try:
                used.add(NormChoice.parse(value).name)
            except (ValueError, yaml.YAMLError):
                continue  # not a choice autonorm wrote: no paper to name
    return [(name, get_spec(name).reference) for name in NORM_NAMES if name in used]


def budget_limit(key: str, value: object) -> str:
    """A budget limit for people: memory in bytes as KiB/MiB/GiB, anything else as it is."""
    if "memory" not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return format_bytes(value)


def state_counts(counts: TrialCounts, *, always: TrialCategory | None = None) -> str:
    """``"3 complete, 1 pruned"``: the non-zero trial counts by category (and ``always``'s,
    even when zero)."""
    return ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s] or s == always)
