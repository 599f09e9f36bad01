"""Lightning callbacks: :class:`AutoNorm`, and reading its checkpoints back."""

from __future__ import annotations

from autonorm.callbacks._autonorm import AutoNorm
from autonorm.callbacks._checkpoints import load_from_checkpoint
from autonorm.callbacks._optimizers import split_mixing_group
from autonorm.callbacks._trial import OOM_REASON, TrialOutcome
from autonorm.surgery import recalibrate_batchnorm

__all__ = [
    "OOM_REASON",
    "AutoNorm",
    "TrialOutcome",
    "load_from_checkpoint",
    "recalibrate_batchnorm",
    "split_mixing_group",
]
