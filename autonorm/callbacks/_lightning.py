"""Both Lightning namespaces: ``pytorch_lightning`` and ``lightning.pytorch``.

The callback subclasses the ``Callback`` of each namespace that is installed, so that a Trainer
from either accepts it.
"""

from __future__ import annotations

import importlib
from typing import Any

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


def import_optional(name: str) -> Any:
    """The module ``name``, or None when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def installed_namespaces() -> list[Any]:
    """The Lightning packages that import here."""
    return [mod for mod in (import_optional(name) for name in NAMESPACES) if mod is not None]


def _callback_bases() -> tuple[type, ...]:
    bases = tuple(mod.Callback for mod in installed_namespaces())
    if not bases:
        raise ImportError(
            "autonorm.callbacks needs PyTorch Lightning: pip install pytorch-lightning"
        )
    return bases


CALLBACK_BASES = _callback_bases()
