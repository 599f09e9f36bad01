"""The staged search: what the next trial is, read from the study's trials.

A user comparing norms by hand trains each uniform family once. The staged plan spends that
compute better, and counts it in the same unit (trainings of ``max_epochs`` epochs):

1. ``screen``: every baseline (the model's own norms, the learned and the recommended config,
   uniform SwitchableNorm, each uniform family, then random configs where the budget leaves
   room; :func:`~autonorm.search._warm_start.warm_start_params`) trains for a rung of about a
   third of the epochs (successive halving, reduction factor :data:`ETA`);
2. ``promote``: the best :data:`PROMOTED` of the screen train the full schedule;
3. ``refine``: around the best full-schedule config, a few moves at a time each change one
   group of slots (a stage, a role: shortcuts, head, attention or MLP norms; see
   :func:`~autonorm.search_spaces.slot_groups`) to what another baseline has there, per-slot
   evidence first: the learned config, or without a learn pass what the screened uniform
   SwitchableNorm's layers weighed highest at the rung (recorded by the trial, no extra
   compute); moves are screened at the rung, and the best one is promoted when its rung
   value beats the incumbent's;
4. ``confirm``: the leading configs train again with other seeds, so that the final choice is
   the best mean, not the luckiest single run (the winner's curse).

Refinement runs only while the budget leaves room for a promotion and one confirmation after
it. Every trial records its stage (and rung and round), so the plan is a function of the study:
any worker, or a resumed run, continues it where it stands. When the plan has nothing left and
only ``n_trials`` bounds the search, the study's sampler proposes the remaining trials.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autonorm import _trial_keys as keys
from autonorm.callbacks import TrialTask
from autonorm.report import is_feasible, params_key, rank_runs, spent_epochs
from autonorm.search_spaces import Parameter

SCREEN, PROMOTE, REFINE, CONFIRM = "screen", "promote", "refine", "confirm"
#: Successive halving's reduction factor: the rung is ``max_epochs / ETA`` epochs.
ETA = 3
#: Screened baselines promoted to the full schedule.
PROMOTED = 2
#: Moves screened per refinement round.
MOVES_PER_ROUND = 3
#: Baselines (best screened first, the incumbent's own left out) whose choices moves borrow.
DONORS = 2
#: Configs re-evaluated before the final choice, and the full runs each should have.
CONFIRM_TOP = 2
CONFIRM_RUNS = 2

RUN, WAIT, DONE = "run", "wait", "done"
#: Stages whose trials the pruner never stops: they were chosen to run the full schedule (a
#: promoted candidate, a re-evaluation with another seed).
UNPRUNED_STAGES = (PROMOTE, CONFIRM)


def rung_epochs(max_epochs: int) -> int:
    """Epochs of a screening trial: a third of the schedule, at least one."""
    return max(1, round(max_epochs / ETA))


@dataclass(frozen=True)
class Candidate:
    """A planned config: its label (``uniform:groupnorm``, ``refine: role:head <- ...``) and
    the trial parameters that give it."""

    label: str
    params: dict[str, str]


@dataclass(frozen=True)
class Planned:
    """A trial the plan wants next."""

    stage: str
    candidate: Candidate
    rung: int | None = None
    round: int = 0

    def user_attrs(self) -> dict[str, Any]:
        """What the study stores of the planned trial (read back by :func:`trial_task`)."""
        attrs: dict[str, Any] = {
            keys.STAGE: self.stage,
            keys.BASELINE: self.candidate.label,
            keys.ROUND: self.round,
        }
        if self.rung is not None:
            attrs[keys.RUNG_EPOCHS] = self.rung
        return attrs


def trial_task(user_attrs: Mapping[str, Any]) -> TrialTask:
    """What a trial is asked to do, from what the plan stored when it enqueued it: its stage,
    the rung it stops at, whether the pruner may stop it. A trial the sampler proposed has no
    stage: the full schedule, prunable."""
    stage = user_attrs.get(keys.STAGE)
    rung = user_attrs.get(keys.RUNG_EPOCHS)
    return TrialTask(
        stage=None if stage is None else str(stage),
        stop_after=None if rung is None else int(rung),
        prunable=stage not in UNPRUNED_STAGES,
    )


@dataclass
class Plan:
    """Decides, under the workers' claim lock, whether a worker runs a trial, waits, or stops.

    Args:
        max_epochs: epochs of one full training (the trials' schedule).
        budget_epochs: the compute cap in epochs (None: no cap).
        n_trials: the cap on finished trials (None: no cap).
        learn_epochs: epochs a learn pass already spent (counted against the budget).
        maximize: the study's direction.
        baselines: the screen (empty: no staged plan, the sampler proposes every trial).
        groups: ``{group name: parameter names}`` that refinement moves change together.
        learned: the learned config's parameters (the first donor of refinement moves).
        mixed_params: turns what a trial's SwitchableNorm layers weighed highest
            (``{slot: choice value}``, recorded by the callback) into trial parameters; without a
            learn pass, the best screened trial that recorded it is the first donor.
        explore: how many of the baselines, at the end, are random configs (screened only where
            the budget leaves room after the others and a confirmation).
    """

    max_epochs: int
    budget_epochs: float | None
    n_trials: int | None
    learn_epochs: int = 0
    maximize: bool = True
    baselines: list[Candidate] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    learned: dict[str, str] | None = None
    mixed_params: Callable[[Mapping[str, Any]], dict[str, str]] | None = None
    explore: int = 0

    @property
    def rung(self) -> int:
        return rung_epochs(self.max_epochs)

    def screen(self) -> list[Planned]:
        """The screening trials to enqueue when the study is created: the first baselines, as
        many as leave room for the promotions within the budget and ``n_trials``. When that is
        fewer than two, the first baselines train the full schedule instead."""
        room = len(self.baselines)
        if self.budget_epochs is not None:
            left = self.budget_epochs - self.learn_epochs - PROMOTED * self.max_epochs
            # room for a confirmation too, unless that would cut the non-random baselines
            confirmed = int((left - self.max_epochs) // self.rung)
            fits = confirmed if confirmed >= room - self.explore else int(left // self.rung)
            room = min(room, fits)
        if self.n_trials is not None:
            room = min(room, self.n_trials - PROMOTED)
        if room < 2:
            count = len(self.baselines) if self.n_trials is None else self.n_trials
            return [Planned(PROMOTE, c) for c in self.baselines[: max(1, count)]]
        return [Planned(SCREEN, c, rung=self.rung) for c in self.baselines[:room]]

    # -- the decision ------------------------------------------------------------------------

    def next(self, study: optuna.Study) -> str:
        """:data:`RUN` (a trial may start; the plan's next one is enqueued), :data:`WAIT`
        (running trials must finish first) or :data:`DONE`."""
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        finished = [t for t in trials if t.state.is_finished()]
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        counted = [t for t in finished if t.state != TrialState.FAIL]
        if self.n_trials is not None and len(counted) + len(running) >= self.n_trials:
            return DONE if len(counted) >= self.n_trials else WAIT
        left = self._left(finished, running)
        if waiting:
            return RUN if self._cost(waiting[0]) <= left else (WAIT if running else DONE)
        if self.baselines:
            planned = self._planned(trials, left)
            if planned == WAIT:
                return WAIT
            if self.n_trials is not None:  # never enqueue more than the study may still run
                planned = planned[: self.n_trials - len(counted) - len(running)]
            for step in planned:
                assert isinstance(step, Planned)
                study.enqueue_trial(step.candidate.params, user_attrs=step.user_attrs())
            if planned:
                return RUN
            if self.budget_epochs is not None:  # the plan is done; the budget is not for sampling
                return WAIT if running else DONE
        return RUN if self.max_epochs <= left else (WAIT if running else DONE)

    def spent(self, trials: Sequence[FrozenTrial]) -> int:
        """Epochs spent: every finished trial's epochs, and the learn pass."""
        return spent_epochs(trials, self.learn_epochs)

    def _left(self, finished: list[FrozenTrial], running: list[FrozenTrial]) -> float:
        if self.budget_epochs is None:
            return math.inf
        return self.budget_epochs - self.spent(finished) - sum(self._cost(t) for t in running)

    def _cost(self, trial: FrozenTrial) -> int:
        return int(trial.user_attrs.get(keys.RUNG_EPOCHS) or self.max_epochs)

    # -- the stages --------------------------------------------------------------------------

    def _planned(self, trials: list[FrozenTrial], left: float) -> list[Planned] | str:
        """The plan's next trials (empty when it has none left), or :data:`WAIT` while a stage
        is unfinished."""
        planned = [t for t in trials if keys.STAGE in t.user_attrs]
        if any(t.state == TrialState.RUNNING for t in planned):
            return WAIT  # stages are synchronous: the next decision needs their results
        evidence = Evidence(trials, self.rung, self.maximize)
        promoted = [t for t in planned if t.user_attrs[keys.STAGE] == PROMOTE]
        if not promoted:
            fresh = [
                c
                for c in evidence.ranked_screen(SCREEN, 0)[:PROMOTED]
                if not evidence.full_runs(c.params)
            ]
            fresh = fresh[: _affordable(left, self.max_epochs)]
            if fresh:
                return [Planned(PROMOTE, c) for c in fresh]
        last_round = max((int(t.user_attrs.get(keys.ROUND, 0)) for t in planned), default=0)
        decided = {int(t.user_attrs.get(keys.ROUND, 0)) for t in promoted}
        if last_round > 0 and last_round not in decided and self.max_epochs <= left:
            moves = evidence.ranked_screen(REFINE, last_round)
            incumbent = evidence.incumbent()
            if moves and incumbent is not None and evidence.beats_at_rung(moves[0], incumbent):
                return [Planned(PROMOTE, moves[0], round=last_round)]
        confirm = self._confirmation(evidence)
        reserve = self.max_epochs if confirm is not None else 0
        moves = self._moves(evidence, trials)
        affordable = _affordable(left - self.max_epochs - reserve, self.rung)
        if self.n_trials is not None:  # keep the last trials for a promotion and a confirmation
            started = sum(t.state != TrialState.FAIL for t in trials)
            affordable = min(affordable, self.n_trials - started - 1 - (confirm is not None))
        if moves and affordable >= 1:
            return [
                Planned(REFINE, move, rung=self.rung, round=last_round + 1)
                for move in moves[: min(MOVES_PER_ROUND, affordable)]
            ]
        if confirm is not None and self.max_epochs <= left:
            return [confirm]
        return []

    def _confirmation(self, evidence: Evidence) -> Planned | None:
        """Another full run of a leading config that has fewer than :data:`CONFIRM_RUNS`."""
        leaders = evidence.leaders()[:CONFIRM_TOP]
        short = [c for c in leaders if len(evidence.full_runs(c.params)) < CONFIRM_RUNS]
        if not short:
            return None
        first = min(short, key=lambda c: len(evidence.full_runs(c.params)))
        return Planned(CONFIRM, first)

    def _moves(self, evidence: Evidence, trials: list[FrozenTrial]) -> list[Candidate]:
        """Untried configs one group away from the incumbent, the learned config's groups first,
        then the other baselines' in their screen order."""
        incumbent = evidence.incumbent()
        if incumbent is None:
            return []
        tried = {params_key(t.params) for t in trials}
        others = [c for c in evidence.ranked_screen(SCREEN, 0) if c.params != incumbent.params]
        # per-slot evidence first (the learned config, else what the best screened
        # SwitchableNorm trial weighed highest: free), then the best other baselines; each
        # changes one group of slots at a time to what it does there
        if self.learned is not None:
            donors = [Candidate("learned", self.learned)]
        else:
            mixed = evidence.mixed_donor(self.mixed_params)
            donors = [] if mixed is None else [mixed]
        donors += others[:DONORS]
        moves: list[Candidate] = []
        for donor, group in ((d, g) for d in donors for g in self.groups):
            params = dict(incumbent.params)
            params.update({n: donor.params[n] for n in self.groups[group] if n in donor.params})
            if params_key(params) not in tried:
                tried.add(params_key(params))
                moves.append(Candidate(f"refine: {group} <- {donor.label}", params))
        return moves


def _affordable(left: float, cost: int) -> int:
    """How many runs of ``cost`` epochs fit in ``left`` (no cap: as many as wanted)."""
    return 1 << 30 if math.isinf(left) else max(0, int(left // cost))


class Evidence:
    """What the study's trials say about each config (trials grouped by their parameters)."""

    def __init__(self, trials: Sequence[FrozenTrial], rung: int, maximize: bool) -> None:
        self.trials = [t for t in trials if t.state.is_finished() and is_feasible(t)]
        self.rung = rung
        self.sign = 1.0 if maximize else -1.0
        self._ranked = rank_runs(self.trials, maximize=maximize)
        self._runs = {params_key(r.trials[0].params): r.values for r in self._ranked}

    def full_runs(self, params: Mapping[str, str]) -> list[float]:
        """The values of the config's full-schedule runs."""
        return self._runs.get(params_key(params), [])

    def rung_value(self, params: Mapping[str, str]) -> float | None:
        """The config's mean value at the end of the rung, over all its trials."""
        key = params_key(params)
        values = [
            t.intermediate_values[self.rung - 1]
            for t in self.trials
            if params_key(t.params) == key and self.rung - 1 in t.intermediate_values
        ]
        values = [v for v in values if math.isfinite(v)]
        return statistics.fmean(values) if values else None

    def ranked_screen(self, stage: str, round_: int) -> list[Candidate]:
        """The configs screened in ``stage`` (and round), best rung value first."""
        seen: dict[Any, Candidate] = {}
        for t in self.trials:
            attrs = t.user_attrs
            if attrs.get(keys.STAGE) == stage and int(attrs.get(keys.ROUND, 0)) == round_:
                label = str(attrs.get(keys.BASELINE, f"trial {t.number}"))
                seen.setdefault(params_key(t.params), Candidate(label, dict(t.params)))
        scored = [(self.rung_value(c.params), c) for c in seen.values()]
        ranked = [(v, c) for v, c in scored if v is not None]
        return [c for _, c in sorted(ranked, key=lambda vc: -self.sign * vc[0])]

    def mixed_donor(
        self, to_params: Callable[[Mapping[str, Any]], dict[str, str]] | None
    ) -> Candidate | None:
        """What the screened trials' SwitchableNorm layers weighed highest, as trial parameters:
        each parameter from the best screened config (by rung value) whose trial recorded it."""
        if to_params is None:
            return None
        params: dict[str, str] = {}
        for screened in self.ranked_screen(SCREEN, 0):
            key = params_key(screened.params)
            for trial in self.trials:
                mixed = trial.user_attrs.get(keys.SWITCHABLE_CHOICES)
                if mixed and params_key(trial.params) == key:
                    params = {**to_params(mixed), **params}
                    break
        return Candidate("switchable weights", params) if params else None

    def leaders(self) -> list[Candidate]:
        """Configs with full-schedule runs, best mean first."""
        return [
            Candidate(r.label or f"trial {r.trials[0].number}", dict(r.trials[0].params))
            for r in self._ranked
        ]

    def incumbent(self) -> Candidate | None:
        leaders = self.leaders()
        return leaders[0] if leaders else None

    def beats_at_rung(self, challenger: Candidate, incumbent: Candidate) -> bool:
        mine, theirs = self.rung_value(challenger.params), self.rung_value(incumbent.params)
        if mine is None:
            return False
        return theirs is None or self.sign * (mine - theirs) > 0


def reuse_finished(
    study: optuna.Study, trial: optuna.Trial, params: Mapping[str, Parameter]
) -> float | list[float] | None:
    """The values of a finished trial that trained the same config as ``trial``, recorded on
    ``trial`` as reused (no training, no compute), or None when ``trial`` must train.

    Planned trials always train (a re-evaluation repeats a config on purpose); a proposal of
    the sampler equal to a COMPLETE trial's config reuses it (TPE repeats itself in small
    discrete spaces). The parameters are suggested here, before training; the callback's
    suggestions then return the same values.
    """
    if keys.STAGE in trial.user_attrs:
        return None
    chosen = {name: trial.suggest_categorical(name, labels) for name, (labels, _) in params.items()}
    key = params_key(chosen)
    for twin in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if params_key(twin.params) == key and keys.REUSED_FROM not in twin.user_attrs:
            trial.set_user_attr(keys.REUSED_FROM, twin.number)
            for name in (keys.CONFIG, keys.FEASIBLE, keys.INFEASIBLE_REASON, keys.BASELINE):
                if name in twin.user_attrs:
                    trial.set_user_attr(name, twin.user_attrs[name])
            values = list(twin.values)
            return values[0] if len(values) == 1 else values
    return None
