"""Lightning callbacks: :class:`AutoNorm`, and reading its checkpoints back."""

from __future__ import annotations

from autonorm.callbacks.autonorm import AutoNorm
from autonorm.callbacks.checkpoints import load_from_checkpoint
from autonorm.callbacks.optimizers import split_mixing_group
from autonorm.callbacks.trial import TrialOutcome
from autonorm.surgery.recalibrate import recalibrate_batchnorm

__all__ = [
    "AutoNorm",
    "TrialOutcome",
    "load_from_checkpoint",
    "recalibrate_batchnorm",
    "split_mixing_group",
]
