"""The staged search: what the next trial is, read from the study's trials.

A user comparing norms by hand trains each uniform family once. The staged plan spends that
compute better, and counts it in the same unit (trainings of ``max_epochs`` epochs):

1. ``screen``: every baseline (the model's own norms, the learned and the recommended config,
   uniform SwitchableNorm, each uniform family, then random configs where the budget leaves
   room; :func:`~autonorm.search._warm_start.warm_start_params`) trains on the full schedule
   (its learning-rate schedule, its ``max_epochs``) and stops at a rung of about a third of the
   epochs (successive halving, reduction factor :data:`ETA`), saving a checkpoint there;
2. ``promote``: the best :data:`PROMOTED` of the screen, and the model's own norms (the
   incumbent: never replaced without a full run of its own), continue their screened run from
   its checkpoint to the end of the schedule (asynchronous successive halving, Li et al. 2020:
   a promoted run is exactly a full run and costs only the remaining epochs). When the rung
   ranks the promoted configs otherwise than their full runs do (the rung does not predict the
   end: slow starters), the next screened config gets a second look;
3. ``refine``: around the best full-schedule config, a few moves at a time each change one
   group of slots (a stage, a role: shortcuts, head, attention or MLP norms; see
   :func:`~autonorm.search_spaces.slot_groups`) to what another baseline has there, per-slot
   evidence first: the learned config, or without a learn pass what the screened uniform
   SwitchableNorm's layers weighed highest at the rung (recorded by the trial, no extra
   compute); moves are screened at the rung, and the best one is promoted when its rung
   value beats the incumbent's;
4. ``confirm``: the leading configs train again with the next seed, so that the final choice
   rests on paired runs, not on the luckiest single run (the winner's curse).

The k-th run of every config trains with the same seed (:data:`~autonorm._trial_keys.RUN_INDEX`,
common random numbers): configs are compared by their paired differences
(:func:`~autonorm.report.rank_runs`), and the incumbent is replaced only where they say the
challenger is better.

Refinement runs only while the budget leaves room for a promotion and one confirmation after
it. Every trial records its stage (and rung and round), so the plan is a function of the study:
any worker, or a resumed run, continues it where it stands. When the plan has nothing left and
only ``n_trials`` bounds the search, the study's sampler proposes the remaining trials.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autonorm import _trial_keys as keys
from autonorm.report import is_feasible, params_key, rank_runs, spent_epochs
from autonorm.search._planned import (
    CONFIRM,
    PROMOTE,
    REFINE,
    SCREEN,
    Candidate,
    Continued,
    Planned,
    rung_epochs,
)
from autonorm.search._workers import fail_trial
from autonorm.search_spaces import Parameter

log = logging.getLogger(__name__)

#: Screened baselines promoted to the full schedule.
PROMOTED = 2
#: Moves screened per refinement round.
MOVES_PER_ROUND = 3
#: Baselines (best screened first, the incumbent's own left out) whose choices moves borrow.
DONORS = 2
#: Configs re-evaluated before the final choice, and the full runs each should have.
CONFIRM_TOP = 2
CONFIRM_RUNS = 2
#: Below this rank correlation between the rung values and the full-run values of the promoted
#: configs, the rung is not trusted to rank this model's configs: the next screened config is
#: promoted too (at most :data:`SECOND_LOOKS` of them).
RUNG_FIDELITY = 0.5
SECOND_LOOKS = 1

RUN, WAIT, DONE = "run", "wait", "done"


@dataclass
class Plan:
    """Decides, under the workers' claim lock, whether a worker runs a trial, waits, or stops.

    Args:
        max_epochs: epochs of one full training (the trials' schedule).
        budget_epochs: the compute cap in epochs (None: no cap).
        n_trials: the cap on finished trials (None: no cap).
        learn_epochs: epochs a learn pass already spent (counted against the budget).
        retrain_epochs: epochs the final retraining will spend (kept out of the trials' share).
        maximize: the study's direction.
        baselines: the screen (empty: no staged plan, the sampler proposes every trial).
        groups: ``{group name: parameter names}`` that refinement moves change together.
        learned: the learned config's parameters (the first donor of refinement moves).
        mixed_params: turns what a trial's SwitchableNorm layers weighed highest
            (``{slot: choice value}``, recorded by the callback) into trial parameters; without a
            learn pass, the best screened trial that recorded it is the first donor.
        explore: how many of the baselines, at the end, are random configs (screened only where
            the budget leaves room after the others and a confirmation).
        extra_screens: screens planned once the first ones are done (the config the screened
            SwitchableNorm model's perturbation chose), kept out of the first screen's room.
    """

    max_epochs: int
    budget_epochs: float | None
    n_trials: int | None
    learn_epochs: int = 0
    retrain_epochs: int = 0
    maximize: bool = True
    baselines: list[Candidate] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    learned: dict[str, str] | None = None
    mixed_params: Callable[[Mapping[str, Any]], dict[str, str]] | None = None
    explore: int = 0
    extra_screens: int = 0

    @property
    def rung(self) -> int:
        return rung_epochs(self.max_epochs)

    @property
    def _promotions(self) -> int:
        """Epochs the first promotions cost: the best screened configs and the guarded ones
        (the own norms, a default the user named), each continued from its rung."""
        guarded = sum(1 for c in self.baselines if c.incumbent)
        return (PROMOTED + guarded) * (self.max_epochs - self.rung)

    def screen(self) -> list[Planned]:
        """The screening trials to enqueue when the study is created: the first baselines, as
        many as leave room for the promotions (and, where the non-random baselines still fit,
        the confirmations; random configs only where every confirmation fits) within the
        budget and ``n_trials``. When that is fewer than two, or
        the schedule is too short for a rung below its end, the first baselines train the
        full schedule instead."""
        room = len(self.baselines)
        if self.budget_epochs is not None:
            left = self.budget_epochs - self.reserved_epochs - self._promotions
            left -= self.extra_screens * self.rung
            # random configs only once every confirmation is paid (the leaders' paired runs
            # decide more than another random screen); the others before any confirmation
            confirmations = CONFIRM_TOP * (CONFIRM_RUNS - 1) * self.max_epochs
            chosen = len(self.baselines) - self.explore
            fits = math.floor((left - confirmations) / self.rung)
            if fits < chosen:
                fits = min(chosen, math.floor(left / self.rung))
            room = min(room, fits)
        if self.n_trials is not None:
            room = min(room, self.n_trials - PROMOTED)
        if room < 2 or self.rung >= self.max_epochs:
            count = len(self.baselines) if self.n_trials is None else self.n_trials
            if room >= 2:  # no rung below the end: the screen's room, in full runs (under
                count = room  # n_trials two trials are kept for the plan, or for a retry)
            return [Planned(PROMOTE, c) for c in self.baselines[: max(1, count)]]
        return [Planned(SCREEN, c, rung=self.rung) for c in self.baselines[:room]]

    # -- the decision ------------------------------------------------------------------------

    def next(self, study: optuna.Study) -> str:
        """:data:`RUN` (a trial may start; the plan's next one is enqueued), :data:`WAIT`
        (running trials must finish first) or :data:`DONE`. A queued trial that no longer fits
        the budget, with nothing running that could leave it room, is skipped (FAIL, with its
        reason): none is left waiting when the search ends."""
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        finished = [t for t in trials if t.state.is_finished()]
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        counted = [t for t in finished if t.state != TrialState.FAIL]
        if self.n_trials is not None and len(counted) + len(running) >= self.n_trials:
            if len(counted) < self.n_trials:
                return WAIT
            # a retry took a queued trial's place: it will not run (a rerun plans anew)
            _skip(study, waiting, f"the study holds its n_trials={self.n_trials}")
            return DONE
        left = self._left(finished, running)
        if waiting:
            fitting = [t for t in waiting if self._cost(t) <= left]
            if fitting and fitting[0] is waiting[0]:
                return RUN
            if running:
                return WAIT  # what they leave decides what still fits
            reason = "the compute budget ended before it could run"
            _skip(study, waiting[: waiting.index(fitting[0])] if fitting else waiting, reason)
            return RUN if fitting else DONE
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

    @property
    def reserved_epochs(self) -> int:
        """Epochs of the budget trials cannot use: the learn pass and the final retraining."""
        return self.learn_epochs + self.retrain_epochs

    def _left(self, finished: list[FrozenTrial], running: list[FrozenTrial]) -> float:
        if self.budget_epochs is None:
            return math.inf
        trained = self.spent(finished) + self.retrain_epochs
        return self.budget_epochs - trained - sum(self._cost(t) for t in running)

    def _cost(self, trial: FrozenTrial) -> int:
        return self._cost_of(trial.user_attrs)

    def _step_cost(self, step: Planned) -> int:
        return self._cost_of(step.user_attrs())

    def _cost_of(self, attrs: Mapping[str, Any]) -> int:
        """The epochs a planned trial trains: to its rung or the end, less those it continues."""
        return int(attrs.get(keys.RUNG_EPOCHS) or self.max_epochs) - int(
            attrs.get(keys.START_EPOCH, 0)
        )

    # -- the stages --------------------------------------------------------------------------

    def _planned(self, trials: list[FrozenTrial], left: float) -> list[Planned] | str:
        """The plan's next trials (empty when it has none left), or :data:`WAIT` while a stage
        is unfinished."""
        planned = [t for t in trials if keys.STAGE in t.user_attrs and t.state != TrialState.FAIL]
        if any(t.state == TrialState.RUNNING for t in planned):
            return WAIT  # stages are synchronous: the next decision needs their results
        evidence = Evidence(trials, self.rung, self.maximize)
        promoted = [t for t in planned if t.user_attrs[keys.STAGE] == PROMOTE]
        confirm = self._confirmation(evidence)
        reserve = self.max_epochs * self._confirmations_needed(evidence)
        if not promoted:
            # the supernet's per-slot choice, screened as the others were
            perturbed = evidence.perturbed(self.mixed_params)
            tried = {params_key(t.params) for t in trials}
            fresh_perturbed = perturbed is not None and params_key(perturbed.params) not in tried
            if fresh_perturbed and self.rung <= left:
                assert perturbed is not None
                return [Planned(SCREEN, perturbed, rung=self.rung)]
            fresh = self._first_promotions(evidence)
            if fresh:
                return self._affordable_promotions(fresh, left)
        last_round = max((int(t.user_attrs[keys.ROUND]) for t in planned), default=0)
        decided = {int(t.user_attrs[keys.ROUND]) for t in promoted}
        if last_round > 0 and last_round not in decided:
            moves = evidence.ranked_screen(REFINE, last_round)
            incumbent = evidence.incumbent()
            if moves and incumbent is not None and evidence.beats_at_rung(moves[0], incumbent):
                step = evidence.promotion(moves[0], round_=last_round)
                if self._step_cost(step) <= left:
                    return [step]
        looks = sum(t.user_attrs[keys.BASELINE].startswith("second look") for t in promoted)
        if looks < SECOND_LOOKS and last_round == 0:
            slow = evidence.second_look()
            if slow is not None and self._step_cost(slow) <= left - reserve:
                return [slow]
        moves = self._moves(evidence, trials)
        promotion = self.max_epochs - self.rung
        affordable = _affordable(left - promotion - reserve, self.rung)
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

    def _first_promotions(self, evidence: Evidence) -> list[Planned]:
        """The best :data:`PROMOTED` screened configs, and the incumbent: each continues its
        screened run."""
        ranked = evidence.ranked_screen(SCREEN, 0)
        chosen = ranked[:PROMOTED] + [c for c in ranked[PROMOTED:] if c.incumbent]
        return [evidence.promotion(c) for c in chosen if not evidence.full_runs(c.params)]

    def _affordable_promotions(self, steps: list[Planned], left: float) -> list[Planned]:
        """The promotions (in order, the incumbent always among them) that ``left`` pays for."""
        out: list[Planned] = []
        for step in sorted(steps, key=lambda p: not p.candidate.incumbent):
            if self._step_cost(step) <= left:
                out.append(step)
                left -= self._step_cost(step)
        return sorted(out, key=steps.index)

    def _confirmations_needed(self, evidence: Evidence) -> int:
        """Full runs the leading configs still lack (what the plan keeps for confirmations)."""
        leaders = evidence.leaders()[:CONFIRM_TOP]
        return sum(max(0, CONFIRM_RUNS - len(evidence.full_runs(c.params))) for c in leaders)

    def _confirmation(self, evidence: Evidence) -> Planned | None:
        """Another full run of a leading config that has fewer than :data:`CONFIRM_RUNS`, with
        the next seed (its runs pair with the other leader's)."""
        leaders = evidence.leaders()[:CONFIRM_TOP]
        short = [c for c in leaders if len(evidence.full_runs(c.params)) < CONFIRM_RUNS]
        if not short:
            return None
        first = min(short, key=lambda c: len(evidence.full_runs(c.params)))
        return Planned(CONFIRM, first, run=evidence.next_run(first.params))

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
            mixed = evidence.perturbed(self.mixed_params) or evidence.mixed_donor(self.mixed_params)
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


def _skip(study: optuna.Study, waiting: Sequence[FrozenTrial], reason: str) -> None:
    """Mark queued trials FAIL with ``reason``: the plan will not run them (under the claim
    lock: no worker takes a queued trial meanwhile)."""
    for trial in waiting:
        fail_trial(study, trial, f"skipped: {reason}")


def _affordable(left: float, cost: int) -> int:
    """How many runs of ``cost`` epochs fit in ``left`` (no cap: as many as wanted)."""
    return sys.maxsize if math.isinf(left) else max(0, math.floor(left / cost))


def spearman(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Spearman's rank correlation of ``pairs`` (None under two pairs or without spread; two
    pairs give 1 or -1: whether their order agrees)."""
    if len(pairs) < 2:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):  # ties share their mean rank
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    xs, ys = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


class Evidence:
    """What the study's trials say about each config (trials grouped by their parameters)."""

    def __init__(self, trials: Sequence[FrozenTrial], rung: int, maximize: bool) -> None:
        self.trials = [t for t in trials if t.state.is_finished() and is_feasible(t)]
        self.rung = rung
        self.maximize = maximize
        self._ranked = rank_runs(self.trials, maximize=maximize)
        self._runs = {params_key(r.trials[0].params): r for r in self._ranked}

    def full_runs(self, params: Mapping[str, str]) -> list[float]:
        """The values of the config's full-schedule runs."""
        runs = self._runs.get(params_key(params))
        return [] if runs is None else runs.values

    def next_run(self, params: Mapping[str, str]) -> int:
        """The run index (the seed) of the next full run of a config that has full runs."""
        return max(self._runs[params_key(params)].run_indices) + 1

    def rung_value(self, params: Mapping[str, str]) -> float | None:
        """The config's mean value at the rung over its screening trials (the first value
        each reported at or after the rung's last epoch: where it stopped, whatever the
        validation interval)."""
        key = params_key(params)
        values = []
        for t in self.trials:
            if params_key(t.params) != key or keys.RUNG_EPOCHS not in t.user_attrs:
                continue
            steps = [s for s in t.intermediate_values if s >= self.rung - 1]
            if steps:
                values.append(t.intermediate_values[min(steps)])
        values = [v for v in values if math.isfinite(v)]
        return statistics.fmean(values) if values else None

    def _screened(self, params: Mapping[str, str]) -> FrozenTrial | None:
        """The config's run-0 trial that stopped at its rung (the one a promotion continues)."""
        key = params_key(params)
        for t in self.trials:
            attrs = t.user_attrs
            if (
                params_key(t.params) == key
                and t.state == TrialState.PRUNED
                and keys.RUNG_EPOCHS in attrs
                and int(attrs[keys.RUN_INDEX]) == 0
                and int(attrs.get(keys.EPOCHS, 0)) >= int(attrs[keys.RUNG_EPOCHS])
            ):
                return t
        return None

    def promotion(self, candidate: Candidate, round_: int = 0) -> Planned:
        """The full run of a screened ``candidate``: its screened run continued (from scratch
        when it has none to continue)."""
        screened = self._screened(candidate.params)
        continued = None
        if screened is not None:
            continued = Continued(screened.number, int(screened.user_attrs[keys.EPOCHS]))
        return Planned(PROMOTE, candidate, round=round_, continues=continued)

    def ranked_screen(self, stage: str, round_: int) -> list[Candidate]:
        """The configs screened in ``stage`` (and round), best rung value first."""
        seen: dict[Any, Candidate] = {}
        for t in self.trials:
            attrs = t.user_attrs
            if attrs.get(keys.STAGE) == stage and int(attrs[keys.ROUND]) == round_:
                label = str(attrs[keys.BASELINE])
                incumbent = int(attrs.get(keys.INCUMBENT, 0))
                seen.setdefault(params_key(t.params), Candidate(label, dict(t.params), incumbent))
        scored = [(self.rung_value(c.params), c) for c in seen.values()]
        ranked = [(v, c) for v, c in scored if v is not None]
        return [c for _, c in sorted(ranked, key=lambda vc: vc[0], reverse=self.maximize)]

    def rung_fidelity(self) -> float | None:
        """How well the rung ranks the configs that also have a full run: Spearman's rank
        correlation of their rung values and the first full run's values."""
        pairs = []
        for runs in self._ranked:
            rung = self.rung_value(runs.trials[0].params)
            if rung is not None:
                pairs.append((rung, runs.values[0]))
        return spearman(pairs)

    def second_look(self) -> Planned | None:
        """When the rung does not predict the full runs (:data:`RUNG_FIDELITY`), the promotion
        of the best screened config without a full run: a slow starter gets its chance."""
        fidelity = self.rung_fidelity()
        if fidelity is None or fidelity >= RUNG_FIDELITY:
            return None
        for candidate in self.ranked_screen(SCREEN, 0):
            if not self.full_runs(candidate.params):
                label = f"second look: {candidate.label} (rung fidelity {fidelity:.2f})"
                step = self.promotion(candidate)
                return Planned(
                    PROMOTE,
                    Candidate(label, candidate.params, candidate.incumbent),
                    continues=step.continues,
                )
        return None

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

    def perturbed(
        self, to_params: Callable[[Mapping[str, Any]], dict[str, str]] | None
    ) -> Candidate | None:
        """The per-slot config the screened SwitchableNorm model's perturbation chose, as trial
        parameters (a slot the space cannot give its choice keeps the supernet's)."""
        if to_params is None:
            return None
        for trial in self.trials:
            chosen = trial.user_attrs.get(keys.PERTURBED_CHOICES)
            if chosen:
                params = {**trial.params, **to_params(chosen)}
                return Candidate("switchable perturbation", params)
        return None

    def leaders(self) -> list[Candidate]:
        """Configs with full-schedule runs, the chosen one first
        (:func:`~autonorm.report.rank_runs`)."""
        return [
            Candidate(r.label or f"trial {r.trials[0].number}", dict(r.trials[0].params), r.guard)
            for r in self._ranked
        ]

    def incumbent(self) -> Candidate | None:
        leaders = self.leaders()
        return leaders[0] if leaders else None

    def beats_at_rung(self, challenger: Candidate, incumbent: Candidate) -> bool:
        mine, theirs = self.rung_value(challenger.params), self.rung_value(incumbent.params)
        if mine is None:
            return False
        return theirs is None or (mine > theirs if self.maximize else mine < theirs)


def reuse_finished(
    study: optuna.Study, trial: optuna.Trial, params: Mapping[str, Parameter]
) -> list[float] | None:
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
            return list(twin.values)  # Optuna takes one value as a list of one
    return None
