"""Picking the winners of a study: the trials that met the budget, the best config, the Pareto
front.

A trial is over the budget when its ``feasible`` user attribute is False; such a trial never
wins, whatever its value. A config trained more than once (re-evaluated with other seeds) is
judged by its runs together, not by its luckiest one: the best of many single noisy runs is
biased upward. Runs pair by their run index (the k-th run of every config trains with the same
seed), and a config replaces the one chosen so far, and in the end the incumbent (the model's
own norms), only when the paired differences say it is better (:func:`rank_runs`).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import optuna
from optuna.trial import FrozenTrial, TrialState

from autonorm._trial_keys import BASELINE, FEASIBLE, INCUMBENT, REUSED_FROM, RUN_INDEX
from autonorm.config import NormChoice
from autonorm.report._types import Certainty

#: How sure the paired evidence must be (the probability, from Student's t, that a challenger is
#: better) before a challenger replaces the config chosen so far.
EVIDENCE = 0.8

#: A hashable key of a config's parameters (:func:`params_key`).
ParamsKey: TypeAlias = tuple[tuple[str, str], ...]


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


def better(value: float, than: float | None, maximize: bool) -> bool:
    """Whether ``value`` beats ``than`` in the study's direction (anything beats None)."""
    return than is None or (value > than if maximize else value < than)


def params_key(params: Mapping[str, object]) -> ParamsKey:
    """A hashable key of a trial's parameters: trials with equal keys trained the same config."""
    return tuple(sorted((k, str(v)) for k, v in params.items()))


@dataclass(frozen=True)
class ConfigRuns:
    """The full-schedule runs of one config: its COMPLETE feasible trials (a reused result is
    not a run), earliest first."""

    trials: tuple[FrozenTrial, ...]

    @property
    def values(self) -> list[float]:
        return [float(t.values[0]) for t in self.trials]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (None with one run)."""
        return statistics.stdev(self.values) if len(self.trials) > 1 else None

    @property
    def label(self) -> str | None:
        return next(
            (str(t.user_attrs[BASELINE]) for t in self.trials if BASELINE in t.user_attrs), None
        )

    @property
    def run_indices(self) -> list[int]:
        """Each run's index, its seed's place (a study without them: the runs in order)."""
        return [int(t.user_attrs.get(RUN_INDEX, i)) for i, t in enumerate(self.trials)]

    @property
    def guard(self) -> int:
        """How strongly the search keeps this config unless the evidence says otherwise: 0
        (not kept), 1 (the model's own norms), 2 (a default the user named)."""
        return max((int(t.user_attrs.get(INCUMBENT) or 0) for t in self.trials), default=0)

    def by_run(self) -> dict[int, float]:
        """Value per run index (a run index trained twice: their mean)."""
        grouped: dict[int, list[float]] = {}
        for index, value in zip(self.run_indices, self.values, strict=True):
            grouped.setdefault(index, []).append(value)
        return {i: statistics.fmean(v) for i, v in grouped.items()}


def mixes_at_inference(config: Mapping[str, object]) -> bool:
    """Whether a trial's config (``{slot: choice value}``) keeps a SwitchableNorm, which mixes
    at inference: no folding, a heavier layer, autonorm needed to run the model."""
    return any(NormChoice.parse(value).name == "switchable" for value in config.values())


def deployable_runs(
    runs: Sequence[ConfigRuns], config_of: Callable[[FrozenTrial], Mapping[str, object]]
) -> ConfigRuns | None:
    """When the chosen config (``runs[0]``) keeps a SwitchableNorm: the best-ranked config of
    plain layers (what a user who must ship plain layers takes instead); else None."""
    if not runs or not mixes_at_inference(config_of(runs[0].trials[0])):
        return None
    return next((r for r in runs[1:] if not mixes_at_inference(config_of(r.trials[0]))), None)


def config_runs(study: optuna.Study) -> list[ConfigRuns]:
    """Every config's runs in a single-objective study, the chosen one first
    (:func:`rank_runs`)."""
    return rank_runs(study.get_trials(deepcopy=False), maximize=maximizes(study))


def rank_runs(trials: Iterable[FrozenTrial], *, maximize: bool) -> list[ConfigRuns]:
    """The configs' full-schedule runs, the chosen config first, the others best mean first
    (ties: earliest).

    The choice rests on evidence, not on the largest single value: it starts from the best
    mean among the configs run most often; a config replaces it only when their paired runs
    (same run index, same seed) say it is better with probability :data:`EVIDENCE`
    (:func:`paired_evidence`); and each guarded config with a run (the model's own norms, then
    a default the user named, which thus has the last word) is replaced by the result only on
    the same evidence. With single runs and nothing guarded this is the best value.
    """
    groups: dict[ParamsKey, list[FrozenTrial]] = {}
    for trial in feasible_complete(trials):
        if REUSED_FROM not in trial.user_attrs:
            groups.setdefault(params_key(trial.params), []).append(trial)
    sign = -1.0 if maximize else 1.0
    runs = [ConfigRuns(tuple(sorted(ts, key=lambda t: t.number))) for ts in groups.values()]
    ranked = sorted(runs, key=lambda r: (sign * r.mean, r.trials[0].number))
    if len(ranked) < 2:
        return ranked
    spread = _pooled_spread(ranked)
    most = max(len(r.trials) for r in ranked)
    chosen = next(r for r in ranked if len(r.trials) == most)
    for challenger in ranked:
        if challenger is chosen:
            continue
        if paired_evidence(challenger, chosen, maximize, spread) >= EVIDENCE:
            chosen = challenger
    for guarded in sorted((r for r in ranked if r.guard), key=lambda r: r.guard):
        if chosen is not guarded and paired_evidence(chosen, guarded, maximize, spread) < EVIDENCE:
            chosen = guarded
    return [chosen, *(r for r in ranked if r is not chosen)]


def _pooled_spread(runs: Sequence[ConfigRuns]) -> tuple[float, int] | None:
    """The seed-to-seed standard deviation pooled over every config run more than once, and
    its degrees of freedom (None when no config ran twice)."""
    freedom = sum(len(r.trials) - 1 for r in runs)
    if freedom == 0:
        return None
    squares = sum((v - r.mean) ** 2 for r in runs for v in r.values)
    return math.sqrt(squares / freedom), freedom


def paired_evidence(
    challenger: ConfigRuns,
    chosen: ConfigRuns,
    maximize: bool,
    spread: tuple[float, int] | None = None,
) -> float:
    """The probability that ``challenger`` is better than ``chosen``, from their paired runs.

    Runs with the same run index trained with the same seed (common random numbers): their
    differences carry less seed noise than the values. Two pairs or more: Student's t on the
    differences. One pair: its difference against the pooled seed spread (``spread``, the
    noise of a difference of two runs: conservative where the pairing removes some). No
    spread known: 1 or 0 by the sign of the difference (the better single value wins).
    """
    mine, theirs = challenger.by_run(), chosen.by_run()
    common = sorted(set(mine) & set(theirs))
    sign = 1.0 if maximize else -1.0
    if common:
        diffs = [sign * (mine[i] - theirs[i]) for i in common]
    else:  # no shared seed: the means
        diffs = [sign * (challenger.mean - chosen.mean)]
    mean = statistics.fmean(diffs)
    if len(diffs) >= 2:
        noise = statistics.stdev(diffs) / math.sqrt(len(diffs))
        freedom = len(diffs) - 1
    elif spread is not None:
        noise, freedom = spread[0] * math.sqrt(2), spread[1]
    else:
        return 1.0 if mean > 0 else 0.0
    if noise <= 0:
        return 1.0 if mean > 0 else (0.5 if mean == 0 else 0.0)
    return student_t_cdf(mean / noise, freedom)


def choice_certainty(runs: Sequence[ConfigRuns], maximize: bool) -> Certainty | None:
    """How sure the choice of ``runs[0]`` over the runner-up is.

    ``gap``: the difference of their means (in the better direction); ``noise``: the standard
    error of that difference, from the seed-to-seed spread pooled over every config run more
    than once (one config's two runs say little about its own spread; None when no config ran
    twice); ``p_better``: the probability that the chosen config is better, from their paired
    runs (:func:`paired_evidence`; None without noise).
    """
    if len(runs) < 2:
        return None
    best, second = runs[0], runs[1]
    gap = (best.mean - second.mean) * (1.0 if maximize else -1.0)
    spread = _pooled_spread(runs)
    if spread is None:
        return Certainty(runner_up=second.label, gap=gap, noise=None, p_better=None)
    pooled, freedom = spread
    noise = pooled * math.sqrt(1 / len(best.trials) + 1 / len(second.trials))
    p_better = paired_evidence(best, second, maximize, spread)
    return Certainty(runner_up=second.label, gap=gap, noise=noise, p_better=p_better)


def student_t_cdf(t: float, freedom: int) -> float:
    """P(T <= t) for Student's t with a positive integer number of degrees of freedom, in
    closed form (Abramowitz & Stegun 26.7.3-4; no SciPy).

    Example::

        >>> round(student_t_cdf(1.0, 1), 4), round(student_t_cdf(2.228, 10), 3)
        (0.75, 0.975)
    """
    if freedom < 1:
        raise ValueError(f"`freedom` must be a positive int, got {freedom!r}")
    theta = math.atan(abs(t) / math.sqrt(freedom))
    cos2 = math.cos(theta) ** 2
    # the series of A(t|freedom), the probability that |T| <= |t|
    term, total = 1.0, 1.0
    if freedom == 1:  # Cauchy
        inside = 2 / math.pi * theta
    elif freedom % 2:
        for k in range(1, (freedom - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            total += term
        inside = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    else:
        for k in range(1, freedom // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        inside = math.sin(theta) * total
    return 0.5 + math.copysign(inside, t) / 2


def best_feasible_trial(study: optuna.Study) -> FrozenTrial | None:
    """The first trial of the best config of a single-objective study that met the budget.

    A trial counts when its ``feasible`` user attribute is not False and its value is finite;
    a config run several times counts by its mean (:func:`config_runs`); "best" follows the
    study's direction. Ties go to the earliest trial.

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
    runs = config_runs(study)
    return copy.deepcopy(runs[0].trials[0]) if runs else None  # the caller may keep or change it


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
        The non-dominated feasible COMPLETE trials with finite values (empty when none); a
        trial that reused another's result is that trial, not a second point.
    """
    trials = feasible_complete(study.get_trials(deepcopy=False))
    candidates = [t for t in trials if REUSED_FROM not in t.user_attrs]
    signs = [-1.0 if maximizes(study, i) else 1.0 for i in range(len(study.directions))]
    return [
        copy.deepcopy(t)
        for t in candidates
        if not any(_dominates(o.values, t.values, signs) for o in candidates if o is not t)
    ]
