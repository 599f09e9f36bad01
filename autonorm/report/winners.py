"""Picking the winners of a study: the trials that met the budget, the best one, the Pareto front.

A trial is over the budget when its ``feasible`` user attribute is False; such a trial never
wins, whatever its value.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from autonorm._trial_keys import FEASIBLE


def is_feasible(trial: FrozenTrial) -> bool:
    """Whether ``trial`` met the budget (no ``feasible=False`` user attribute)."""
    return trial.user_attrs.get(FEASIBLE, True) is not False


def has_finite_values(trial: FrozenTrial) -> bool:
    """Whether ``trial`` has objective values and all of them are finite."""
    values = trial.values
    return bool(values) and all(v is not None and math.isfinite(v) for v in values)


def feasible_complete(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """COMPLETE trials within the budget whose objective values are all finite."""
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and is_feasible(t) and has_finite_values(t)
    ]


def maximizes(study: optuna.Study, objective: int = 0) -> bool:
    """Whether the study maximizes its objective number ``objective``."""
    return study.directions[objective] == optuna.study.StudyDirection.MAXIMIZE


def best_feasible_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best COMPLETE trial of a single-objective study that met the budget.

    A trial counts when its ``feasible`` user attribute is not False and its value is finite;
    "best" follows the study's direction. Ties go to the earliest trial.

    Args:
        study: a single-objective study.

    Returns:
        The trial, or None when no trial qualifies (no trials, or all of them pruned, failed or
        over the budget).

    Raises:
        ValueError: ``study`` has more than one objective (use :func:`pareto_trials`).

    Example::

        >>> import optuna
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> study = optuna.create_study(direction="maximize")
        >>> study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={"feasible": False}))
        >>> study.add_trial(optuna.trial.create_trial(value=0.7))
        >>> best_feasible_trial(study).value
        0.7
    """
    if len(study.directions) != 1:
        raise ValueError(
            f"best_feasible_trial needs a single-objective study, study {study.study_name!r} has "
            f"{len(study.directions)} objectives; use pareto_trials()"
        )
    candidates = feasible_complete(study.get_trials(deepcopy=False))
    if not candidates:
        return None
    sign = -1.0 if maximizes(study) else 1.0
    best = min(candidates, key=lambda t: (sign * t.values[0], t.number))
    return copy.deepcopy(best)  # the caller may keep or change it


def _dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[float]) -> bool:
    """Whether ``a`` dominates ``b`` (values multiplied by ``signs`` are minimized)."""
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a, b, strict=True)]
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front of the trials that met the budget, ordered by trial number.

    This is ``study.best_trials`` restricted to feasible trials, computed among the feasible
    COMPLETE trials only, so that a trial over the budget never hides a feasible one it would
    dominate. On a single-objective study it returns the best feasible trial and its ties.

    Args:
        study: a study with one or more objectives.

    Returns:
        The non-dominated feasible COMPLETE trials with finite values (empty when none).
    """
    candidates = feasible_complete(study.get_trials(deepcopy=False))
    signs = [-1.0 if maximizes(study, i) else 1.0 for i in range(len(study.directions))]
    return [
        copy.deepcopy(t)
        for t in candidates
        if not any(_dominates(o.values, t.values, signs) for o in candidates if o is not t)
    ]
