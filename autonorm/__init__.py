"""autonorm: choose the normalization layer of every norm slot of a PyTorch model."""

from __future__ import annotations

from typing import Any

from autonorm._errors import AutoNormError, ConfigError
from autonorm.budget import Budget
from autonorm.config import NormChoice, NormConfig
from autonorm.deploy import fold_norms
from autonorm.norms import NORM_NAMES, SwitchableNorm, create_norm
from autonorm.recommendation import format_reasons, recommend
from autonorm.surgery import (
    Slot,
    apply_config,
    derive_config,
    find_slots,
    register_slot_type,
    to_switchable,
)

__version__ = "0.1.0"

# Imported on first use: they pull in Lightning and Optuna.
# `search` is the callable package autonorm.search (see autonorm/search/__init__.py).
_LAZY: dict[str, tuple[str, str | None]] = {
    "search": ("autonorm.search", None),
    "SearchResult": ("autonorm.search", "SearchResult"),
    "load_from_checkpoint": ("autonorm.callbacks", "load_from_checkpoint"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        loaded = importlib.import_module(module)
        return loaded if attr is None else getattr(loaded, attr)
    raise AttributeError(f"module 'autonorm' has no attribute {name!r}")


__all__ = [
    "NORM_NAMES",
    "AutoNormError",
    "Budget",
    "ConfigError",
    "NormChoice",
    "NormConfig",
    "SearchResult",
    "Slot",
    "SwitchableNorm",
    "__version__",
    "apply_config",
    "create_norm",
    "derive_config",
    "find_slots",
    "fold_norms",
    "format_reasons",
    "load_from_checkpoint",
    "recommend",
    "register_slot_type",
    "search",
    "to_switchable",
]
