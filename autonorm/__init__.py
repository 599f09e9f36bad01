"""autonorm: choose the normalization layer of every norm slot of a PyTorch model."""

from __future__ import annotations

from autonorm._errors import AutoNormError, ConfigError
from autonorm.norms import NORM_NAMES, SwitchableNorm, create_norm

__version__ = "0.1.0"

__all__ = [
    "NORM_NAMES",
    "AutoNormError",
    "ConfigError",
    "SwitchableNorm",
    "__version__",
    "create_norm",
]
