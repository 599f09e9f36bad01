"""Lightning callbacks that rewrite a model's norm slots, one concern each, and their checkpoints.

:class:`AutoNorm` is the shared base and the documented factory: ``AutoNorm(mode=...)`` builds
:class:`LearnNorms` (learn SwitchableNorm), :class:`TrialNorms` (drive an Optuna trial; the
search hands it a :class:`TrialTask` and reads a :class:`TrialOutcome`) or :class:`FixedNorms`
(apply a saved config). :func:`load_from_checkpoint` rebuilds a model from a checkpoint that
one of them wrote.
"""

from __future__ import annotations

from autonorm.callbacks._checkpoints import (
    load_from_checkpoint,
    restore_into,
    structure_from_checkpoint,
)
from autonorm.callbacks._fixed import FixedNorms
from autonorm.callbacks._learn import LearnNorms
from autonorm.callbacks._optimizers import split_mixing_group
from autonorm.callbacks._rewrite import MODES, AutoNorm, current_structure
from autonorm.callbacks._trial import (
    OOM_REASON,
    TrialNorms,
    TrialOutcome,
    TrialTask,
    infeasible_reason,
    mark_infeasible,
)
from autonorm.surgery import recalibrate_batchnorm

__all__ = [
    "MODES",
    "OOM_REASON",
    "AutoNorm",
    "FixedNorms",
    "LearnNorms",
    "TrialNorms",
    "TrialOutcome",
    "TrialTask",
    "current_structure",
    "infeasible_reason",
    "load_from_checkpoint",
    "restore_into",
    "mark_infeasible",
    "recalibrate_batchnorm",
    "split_mixing_group",
    "structure_from_checkpoint",
]
