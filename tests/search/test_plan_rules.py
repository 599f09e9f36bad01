"""The staged plan's rules one by one, each where it decides: the screen's size against the rules
its docstring states (over a grid of budgets, caps and baselines), every step that costs exactly
what is left (it runs; one epoch less and it does not), the second look's fidelity threshold and
its single use, the refinement's room under ``n_trials``, and the evidence read from trials
built by hand (rank correlation, donors, the incumbent)."""

from __future__ import annotations

import itertools
import random

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from scipy import stats

from autonorm import _trial_keys as keys
from autonorm.search._plan import (
    CONFIRM_RUNS,
    CONFIRM_TOP,
    DONE,
    PROMOTED,
    RUN,
    WAIT,
    Evidence,
    Plan,
    reuse_finished,
    spearman,
)
from autonorm.search._planned import (
    CONFIRM,
    PROMOTE,
    REFINE,
    SCREEN,
    Candidate,
    Continued,
    Planned,
)
from tests.search.test_plan import MAX_EPOCHS, PARAMS, objective, run, staged_plan, uniform

RUNG = 3  # of MAX_EPOCHS = 9


def expected_screen(plan: Plan) -> list[tuple[str, str, int | None]]:
    """The screen ``plan.screen()`` must give, from the rules as stated: the most baselines whose
    rungs fit the budget after the reserved epochs, the first promotions and the extra screens,
    random configs (the last ``explore``) only where every confirmation fits too; at most
    ``n_trials - PROMOTED``; under two screens (or no rung below the end) full runs instead."""
    rung, n = plan.rung, len(plan.baselines)
    room = n
    if plan.budget_epochs is not None:
        guarded = sum(1 for c in plan.baselines if c.incumbent)
        left = (
            plan.budget_epochs
            - plan.learn_epochs
            - plan.retrain_epochs
            - (PROMOTED + guarded) * (plan.max_epochs - rung)
            - plan.extra_screens * rung
        )
        confirmations = CONFIRM_TOP * (CONFIRM_RUNS - 1) * plan.max_epochs

        def fits(k: int) -> bool:
            return k * rung + (confirmations if k > n - plan.explore else 0) <= left

        room = max((k for k in range(n + 1) if fits(k)), default=0)
    if plan.n_trials is not None:
        room = min(room, plan.n_trials - PROMOTED)
    if room >= 2 and rung < plan.max_epochs:
        return [(SCREEN, c.label, rung) for c in plan.baselines[:room]]
    count = room if room >= 2 else (n if plan.n_trials is None else plan.n_trials)
    return [(PROMOTE, c.label, None) for c in plan.baselines[: max(1, count)]]


def test_the_screen_is_the_largest_its_rules_allow_over_a_grid_of_budgets():
    families = ["bn", "gn", "in", "ln", "rms", "sn"]
    checked = set()
    for (
        max_epochs,
        trainings,
        n_trials,
        n,
        explore,
        extra,
        learn,
        retrain,
        own,
    ) in itertools.product(
        (1, 2, 3, 9, 12),  # 1 and 2: no rung below the end
        (None, 1, 2.5, 3, 4, 5.5, 7, 10),
        (None, 1, 2, 3, 5, 9),
        (1, 3, 6),
        (0, 2),
        (0, 1),
        (0, 4),
        (0, 9),
        (False, True),
    ):
        baselines = [uniform(f, incumbent=own and i == 0) for i, f in enumerate(families[:n])]
        plan = Plan(
            max_epochs=max_epochs,
            budget_epochs=None if trainings is None else trainings * max_epochs,
            n_trials=n_trials,
            learn_epochs=learn,
            retrain_epochs=retrain,
            baselines=baselines,
            explore=min(explore, n),
            extra_screens=extra,
        )
        got = [(p.stage, p.candidate.label, p.rung) for p in plan.screen()]
        assert got == expected_screen(plan), plan
        checked.add((got[0][0], len(got)))
    # the grid reaches both kinds of screen at many sizes
    assert {stage for stage, _ in checked} == {SCREEN, PROMOTE}
    assert len(checked) >= 10


def test_spearman_matches_scipy_with_ties_and_is_none_without_spread():
    rng = random.Random(0)
    for size in (2, 3, 5, 8):
        for _ in range(20):
            pairs = [(rng.choice([0, 1, 2, 3]), rng.choice([0.5, 1.5, 2.5])) for _ in range(size)]
            xs, ys = zip(*pairs, strict=True)
            if len(set(xs)) < 2 or len(set(ys)) < 2:
                assert spearman(pairs) is None
                continue
            assert spearman(pairs) == pytest.approx(stats.spearmanr(xs, ys).statistic, abs=1e-12)
    assert spearman([(1.0, 2.0)]) is None
    assert spearman([(1.0, 2.0), (1.0, 3.0)]) is None  # no spread in the first
    assert spearman([(1.0, 2.0), (3.0, 2.0)]) is None  # nor in the second


# -- trials built by hand ------------------------------------------------------------------------

DISTRIBUTIONS = {name: CategoricalDistribution(["bn", "gn", "in", "ln"]) for name in PARAMS}


def cfg(choice: str) -> dict[str, str]:
    return dict.fromkeys(PARAMS, choice)


def add(study: optuna.Study, params, state, attrs, value=None, rung_value=None) -> None:
    intermediate = {} if rung_value is None else {RUNG - 1: rung_value}
    study.add_trial(
        optuna.trial.create_trial(
            params=params,
            distributions=DISTRIBUTIONS,
            state=state,
            value=value,
            intermediate_values=intermediate,
            user_attrs=attrs,
        )
    )


def screened(study, choice: str, rung_value: float, incumbent=False, **extra) -> None:
    step = Planned(SCREEN, uniform(choice, incumbent), rung=RUNG)
    attrs = {**step.user_attrs(), keys.EPOCHS: RUNG, **extra}
    add(study, cfg(choice), TrialState.PRUNED, attrs, rung_value=rung_value)


def promoted(
    study, choice: str, value: float, run_index: int = 0, label: str = "", incumbent=False
) -> None:
    candidate = Candidate(label or f"uniform:{choice}", cfg(choice), incumbent)
    step = Planned(PROMOTE, candidate, run=run_index)
    add(study, cfg(choice), TrialState.COMPLETE, {**step.user_attrs(), keys.EPOCHS: 6}, value)


def evidence(study: optuna.Study, maximize: bool = True) -> Evidence:
    return Evidence(study.trials, RUNG, maximize)


def fidelity_study(full_values: dict[str, float]) -> optuna.Study:
    """Screened bn > gn > in > ln at the rung; full runs of ``full_values``."""
    study = optuna.create_study(direction="maximize")
    for choice, at_rung in zip(("bn", "gn", "in", "ln"), (0.9, 0.8, 0.7, 0.6), strict=True):
        screened(study, choice, at_rung)
    for choice, value in full_values.items():
        promoted(study, choice, value)
    return study


def test_a_rung_that_ranks_as_well_as_the_threshold_gets_no_second_look():
    # rung order bn > gn > in; full runs bn > in > gn: Spearman 0.5, the threshold itself
    at_threshold = evidence(fidelity_study({"bn": 0.95, "gn": 0.85, "in": 0.9}))
    assert at_threshold.rung_fidelity() == pytest.approx(0.5)
    assert at_threshold.second_look() is None
    below = evidence(fidelity_study({"bn": 0.85, "gn": 0.9, "in": 0.95}))  # reversed: -1
    look = below.second_look()
    assert look is not None and look.candidate.params == cfg("ln")  # the best without a full run
    assert look.candidate.label.startswith("second look: uniform:ln")
    assert look.continues is not None and look.continues.epochs == RUNG


def test_a_second_look_at_the_own_norms_keeps_them_guarded():
    """The own norms' promoted run failed (no full run): a second look promotes them as the
    incumbent still, whom only paired evidence replaces."""
    study = optuna.create_study(direction="maximize")
    screened(study, "bn", 0.9, incumbent=True)
    screened(study, "gn", 0.8)
    screened(study, "in", 0.7)
    promoted(study, "gn", 0.5)
    promoted(study, "in", 0.9)
    look = evidence(study).second_look()
    assert look is not None and look.candidate.params == cfg("bn")
    assert look.candidate.incumbent and look.user_attrs()[keys.INCUMBENT]


def test_one_second_look_only_and_only_before_refinement():
    plan = staged_plan(trainings=None)
    study = fidelity_study({"bn": 0.85, "gn": 0.9})  # the rung misranked the two it promoted
    steps = plan._planned(study.trials, left=10 * MAX_EPOCHS)
    assert isinstance(steps, list) and steps[0].candidate.label.startswith("second look")
    promoted(study, "in", 0.95, label="second look: in")  # it ran; the rung still misranks
    assert evidence(study).rung_fidelity() == pytest.approx(-1.0)
    after = plan._planned(study.trials, left=10 * MAX_EPOCHS)
    assert isinstance(after, list) and after
    assert not any(s.candidate.label.startswith("second look") for s in after)
    assert {s.stage for s in after} == {REFINE}


def test_a_second_look_costs_the_rest_of_its_run_and_leaves_the_confirmations_paid():
    plan = staged_plan(trainings=None)
    study = fidelity_study({"bn": 0.85, "gn": 0.9})
    # the leaders (gn, bn) each lack one full run: two confirmations are kept
    reserve = MAX_EPOCHS * CONFIRM_TOP * (CONFIRM_RUNS - 1)
    cost = MAX_EPOCHS - RUNG
    exact = plan._planned(study.trials, left=cost + reserve)
    assert exact and exact[0].candidate.label.startswith("second look")
    short = plan._planned(study.trials, left=cost + reserve - 1)
    assert not any(s.candidate.label.startswith("second look") for s in short)


def test_a_refinement_round_whose_best_move_beats_the_incumbent_is_promoted_if_it_fits():
    plan = staged_plan(trainings=None)
    study = optuna.create_study(direction="maximize")
    screened(study, "bn", 0.5)
    screened(study, "gn", 0.6)
    promoted(study, "bn", 0.7)
    promoted(study, "gn", 0.8)
    move = Planned(REFINE, Candidate("refine: slot:a <- bn", cfg("in")), rung=RUNG, round=1)
    add(study, cfg("in"), TrialState.PRUNED, {**move.user_attrs(), keys.EPOCHS: RUNG}, None, 0.9)
    exact = plan._planned(study.trials, left=MAX_EPOCHS - RUNG)
    assert [(s.stage, s.round, s.candidate.params) for s in exact] == [(PROMOTE, 1, cfg("in"))]
    assert exact[0].continues is not None and exact[0].continues.epochs == RUNG
    short = plan._planned(study.trials, left=MAX_EPOCHS - RUNG - 1)
    assert not any(s.stage == PROMOTE for s in short)


def test_a_challenger_without_a_rung_value_never_beats_the_incumbent():
    study = optuna.create_study(direction="maximize")
    screened(study, "bn", 0.5)
    promoted(study, "bn", 0.7)
    ev = evidence(study)
    incumbent = ev.incumbent()
    assert incumbent is not None and incumbent.params == cfg("bn")
    assert not ev.beats_at_rung(Candidate("never screened", cfg("gn")), incumbent)
    screened(study, "gn", 0.6)
    assert evidence(study).beats_at_rung(Candidate("screened", cfg("gn")), incumbent)
    assert not evidence(study, maximize=False).beats_at_rung(Candidate("s", cfg("gn")), incumbent)


def test_evidence_without_a_full_run_has_no_incumbent_and_no_moves():
    study = optuna.create_study(direction="maximize")
    screened(study, "bn", 0.5)
    ev = evidence(study)
    assert ev.incumbent() is None and ev.leaders() == []
    assert staged_plan(trainings=None)._moves(ev, study.trials) == []


def test_the_switchable_donor_reads_each_screened_config_s_own_recorded_choices():
    study = optuna.create_study(direction="maximize")
    screened(study, "bn", 0.5, **{keys.SWITCHABLE_CHOICES: {"a": "gn"}})
    screened(study, "gn", 0.9, **{keys.SWITCHABLE_CHOICES: {"a": "in", "b": "in"}})
    screened(study, "in", 0.7)
    donor = evidence(study).mixed_donor(dict)
    # the best screened config's choices win; the others fill in only what it lacks
    assert donor is not None and donor.params == {"a": "in", "b": "in"}
    assert evidence(study).mixed_donor(None) is None
    silent = optuna.create_study(direction="maximize")
    screened(silent, "bn", 0.5)
    assert evidence(silent).mixed_donor(dict) is None


def test_without_a_learned_config_the_perturbed_choice_is_the_first_donor():
    plan = staged_plan(trainings=None)
    plan.mixed_params = dict
    study = optuna.create_study(direction="maximize")
    screened(study, "bn", 0.5, **{keys.SWITCHABLE_CHOICES: {"c": "gn"}})
    screened(study, "gn", 0.6, **{keys.PERTURBED_CHOICES: {"a": "in"}})
    promoted(study, "gn", 0.8)
    moves = plan._moves(evidence(study), study.trials)
    assert moves[0].label == "refine: slot:a <- switchable perturbation"
    assert moves[0].params == {**cfg("gn"), "a": "in"}


def test_the_perturbed_config_is_screened_at_the_rung_when_exactly_a_rung_is_left():
    plan = staged_plan(trainings=None)
    plan.mixed_params = dict
    study = optuna.create_study(direction="maximize")
    screened(study, "bn", 0.5)
    screened(study, "gn", 0.6, **{keys.PERTURBED_CHOICES: {"a": "in"}})
    exact = plan._planned(study.trials, left=RUNG)
    assert [(s.stage, s.rung, s.candidate.label) for s in exact] == [
        (SCREEN, RUNG, "switchable perturbation")
    ]
    assert exact[0].user_attrs()[keys.RUNG_EPOCHS] == RUNG
    assert not any(
        s.candidate.label == "switchable perturbation"
        for s in plan._planned(study.trials, left=RUNG - 1)
    )


def test_a_confirmation_that_costs_exactly_what_is_left_runs():
    plan = staged_plan(trainings=None)
    plan.groups = {}  # no refinement moves: only the confirmation is left
    study = optuna.create_study(direction="maximize")
    screened(study, "bn", 0.5)
    screened(study, "gn", 0.6)
    promoted(study, "bn", 0.7)
    promoted(study, "gn", 0.8)
    exact = plan._planned(study.trials, left=MAX_EPOCHS)
    assert [(s.stage, s.run) for s in exact] == [(CONFIRM, 1)]
    assert plan._planned(study.trials, left=MAX_EPOCHS - 1) == []


@pytest.mark.parametrize("n_trials", [8, 9, 10, 11, 12, 13])
def test_under_n_trials_alone_refinement_keeps_trials_for_its_promotion_and_confirmation(
    n_trials,
):
    """No compute cap, only ``n_trials``: the plan uses every trial, refinement runs, a round
    whose best move beats the incumbent at the rung gets its promotion, and the search ends
    with a confirmation."""
    study = run(staged_plan(trainings=None, n_trials=n_trials))
    trials = study.trials
    assert len(trials) == n_trials
    assert trials[-1].user_attrs[keys.STAGE] == CONFIRM
    rounds = {t.user_attrs[keys.ROUND] for t in trials if t.user_attrs[keys.STAGE] == REFINE}
    assert rounds, "refinement ran"
    for round_ in rounds:
        last = max(
            i
            for i, t in enumerate(trials)
            if t.user_attrs[keys.STAGE] == REFINE and t.user_attrs[keys.ROUND] == round_
        )
        ev = Evidence(trials[: last + 1], RUNG, True)
        best, incumbent = ev.ranked_screen(REFINE, round_)[0], ev.incumbent()
        assert incumbent is not None
        promoted_ = any(
            t.user_attrs[keys.STAGE] == PROMOTE and t.user_attrs[keys.ROUND] == round_
            for t in trials
        )
        assert promoted_ == ev.beats_at_rung(best, incumbent), round_


def test_the_plan_counts_only_trials_that_did_not_fail_against_n_trials():
    """A failed trial (retried) does not use up a place: the plan still fills ``n_trials``."""
    plan = staged_plan(trainings=None, n_trials=10)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    for step in plan.screen():
        study.enqueue_trial(step.candidate.params, user_attrs=step.user_attrs())
    failed = False
    for _ in range(100):
        if plan.next(study) != "run":
            break
        if not failed:  # the first trial fails once and is retried as a fresh queued trial
            failed = True
            study.optimize(lambda t: 1 / 0, n_trials=1, catch=(ZeroDivisionError,))
            first = study.trials[0]
            study.enqueue_trial(first.params, user_attrs=first.user_attrs)
            continue
        study.optimize(objective, n_trials=1)
    done = [t for t in study.trials if t.state != TrialState.FAIL]
    assert len(done) == 10
    assert any(t.user_attrs.get(keys.STAGE) == REFINE for t in done)


def test_the_first_promotions_pay_for_the_incumbent_first_and_keep_their_order():
    plan = staged_plan(trainings=None)
    cost = MAX_EPOCHS - RUNG
    best, second, own = (
        Planned(PROMOTE, uniform("gn"), continues=Continued(0, RUNG)),
        Planned(PROMOTE, uniform("in"), continues=Continued(1, RUNG)),
        Planned(PROMOTE, uniform("bn", incumbent=True), continues=Continued(2, RUNG)),
    )
    steps = [best, second, own]
    assert plan._affordable_promotions(steps, left=3 * cost) == steps
    assert plan._affordable_promotions(steps, left=2 * cost) == [best, own]
    assert plan._affordable_promotions(steps, left=2 * cost - 1) == [own]
    assert plan._affordable_promotions(steps, left=cost - 1) == []


def test_a_promotion_continues_only_a_screened_run_that_reached_its_rung():
    study = optuna.create_study(direction="maximize")
    screened(study, "bn", 0.5)
    step = Planned(SCREEN, uniform("gn"), rung=1)  # stopped (pruned) before recording an epoch
    add(study, cfg("gn"), TrialState.PRUNED, step.user_attrs(), rung_value=0.4)
    ev = evidence(study)
    assert ev.promotion(uniform("bn")).continues == Continued(0, RUNG)
    for never in (uniform("gn"), uniform("in")):  # no epoch recorded; never screened
        fresh = ev.promotion(never)
        assert fresh.continues is None and keys.START_EPOCH not in fresh.user_attrs()


def test_the_leaders_keep_their_labels_and_the_own_norms_confirm_as_the_incumbent():
    plan = staged_plan(trainings=None)
    study = optuna.create_study(direction="maximize")
    screened(study, "bn", 0.5, incumbent=True)
    screened(study, "gn", 0.6)
    promoted(study, "bn", 0.8, label="own norms", incumbent=True)
    promoted(study, "gn", 0.7)
    ev = evidence(study)
    assert [(c.label, bool(c.incumbent)) for c in ev.leaders()] == [
        ("own norms", True),
        ("uniform:gn", False),
    ]
    confirm = plan._confirmation(ev)
    assert confirm is not None and confirm.candidate.params == cfg("bn") and confirm.run == 1
    assert confirm.user_attrs()[keys.INCUMBENT]


def test_a_sampled_leader_without_a_label_is_named_by_its_trial():
    study = optuna.create_study(direction="maximize")
    promoted(study, "bn", 0.7)
    add(study, cfg("in"), TrialState.COMPLETE, {}, value=0.9)  # the sampler's: no plan attrs
    assert [c.label for c in evidence(study).leaders()] == ["trial 1", "uniform:bn"]
    confirm = staged_plan(trainings=None)._confirmation(evidence(study))
    assert confirm is not None and confirm.user_attrs()[keys.BASELINE] == "trial 1"


def test_the_rung_value_is_the_first_reported_at_or_after_the_rung_s_last_epoch():
    study = optuna.create_study(direction="maximize")
    step = Planned(SCREEN, uniform("bn"), rung=RUNG)
    every_epoch = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}
    study.add_trial(
        optuna.trial.create_trial(
            params=cfg("bn"),
            distributions=DISTRIBUTIONS,
            state=TrialState.PRUNED,
            intermediate_values=every_epoch,
            user_attrs={**step.user_attrs(), keys.EPOCHS: RUNG + 1},
        )
    )
    every_other = {0: 0.1, 3: 0.5, 5: 0.7}  # validated every third epoch: none at the rung's
    step = Planned(SCREEN, uniform("gn"), rung=RUNG)
    study.add_trial(
        optuna.trial.create_trial(
            params=cfg("gn"),
            distributions=DISTRIBUTIONS,
            state=TrialState.PRUNED,
            intermediate_values=every_other,
            user_attrs={**step.user_attrs(), keys.EPOCHS: RUNG},
        )
    )
    ev = evidence(study)
    assert ev.rung_value(cfg("bn")) == 0.3
    assert ev.rung_value(cfg("gn")) == 0.5


def test_a_reused_result_carries_its_twin_s_config_and_feasibility_and_not_a_planned_trial():
    study = optuna.create_study(direction="maximize")
    space = {"a": (["bn", "gn"], ["a"])}
    recorded = {keys.CONFIG: "a: gn", keys.FEASIBLE: False, keys.INFEASIBLE_REASON: "memory"}

    def first(trial: optuna.Trial) -> float:
        trial.suggest_categorical("a", ["bn", "gn"])
        for name, value in recorded.items():
            trial.set_user_attr(name, value)
        return 0.7

    study.enqueue_trial({"a": "gn"}, user_attrs={keys.BASELINE: "uniform:gn"})
    study.optimize(first, n_trials=1)
    study.enqueue_trial({"a": "gn"})
    study.optimize(lambda t: reuse_finished(study, t, space) or 0.1, n_trials=1)
    assert study.trials[1].user_attrs == {
        **recorded,
        keys.BASELINE: "uniform:gn",
        keys.REUSED_FROM: 0,
    }
    # a planned trial of the same config trains (a re-evaluation repeats it on purpose)
    planned = Planned(CONFIRM, Candidate("again", {"a": "gn"}), run=1)
    study.enqueue_trial({"a": "gn"}, user_attrs=planned.user_attrs())
    study.optimize(lambda t: reuse_finished(study, t, space) or 0.1, n_trials=1)
    assert study.trials[2].value == 0.1 and keys.REUSED_FROM not in study.trials[2].user_attrs


def test_a_reused_result_of_two_objectives_keeps_both_values():
    study = optuna.create_study(directions=["maximize", "minimize"])
    space = {"a": (["bn", "gn"], ["a"])}
    study.enqueue_trial({"a": "gn"})
    study.optimize(lambda t: reuse_finished(study, t, space) or [0.7, 120.0], n_trials=1)
    study.enqueue_trial({"a": "gn"})
    study.optimize(lambda t: reuse_finished(study, t, space) or [0.1, 5.0], n_trials=1)
    assert study.trials[1].values == [0.7, 120.0]
    assert study.trials[1].state == TrialState.COMPLETE


def study_with(states: list[TrialState]) -> optuna.Study:
    """Trials of the sampler (no plan attrs) in ``states``; a WAITING one is queued last."""
    study = optuna.create_study(direction="maximize")
    for state in states:
        if state == TrialState.WAITING:
            study.enqueue_trial(cfg("gn"))
        else:
            value = 0.5 if state == TrialState.COMPLETE else None
            add(study, cfg("bn"), state, {}, value=value)
    return study


def test_n_trials_counts_running_trials_and_skips_a_queued_one_once_the_study_is_full():
    plan = Plan(max_epochs=MAX_EPOCHS, budget_epochs=None, n_trials=3)
    busy = study_with([TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING])
    busy.enqueue_trial(cfg("gn"))
    assert plan.next(busy) == WAIT  # the running one may still fail and leave its place
    full = study_with([TrialState.COMPLETE] * 3 + [TrialState.WAITING])
    assert plan.next(full) == DONE
    skipped = full.trials[-1]
    assert skipped.state == TrialState.FAIL
    assert skipped.user_attrs[keys.FAIL_REASON] == "skipped: the study holds its n_trials=3"
    failed = study_with([TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL])
    failed.enqueue_trial(cfg("gn"))
    assert plan.next(failed) == RUN  # a failed trial holds no place


def test_the_plan_enqueues_no_more_than_the_places_n_trials_leaves_beside_running_trials():
    plan = staged_plan(trainings=None, n_trials=5)
    study = optuna.create_study(direction="maximize")
    for choice, value in (("bn", 0.5), ("gn", 0.6), ("in", 0.7)):
        screened(study, choice, value)
    add(study, cfg("ln"), TrialState.RUNNING, {})  # the sampler's, still training
    assert plan.next(study) == RUN
    queued = [t for t in study.trials if t.state == TrialState.WAITING]
    fixed = [(t.user_attrs[keys.STAGE], t.system_attrs["fixed_params"]) for t in queued]
    assert fixed == [(PROMOTE, cfg("in"))]  # the best screened; the second waits for a place


def confirmed_study(runs: int) -> optuna.Study:
    """bn and gn screened and promoted, each with ``runs`` full runs; the rung misranked them."""
    study = optuna.create_study(direction="maximize")
    for choice, at_rung in (("bn", 0.9), ("gn", 0.8), ("in", 0.7)):
        screened(study, choice, at_rung)
    for run_index in range(runs):
        promoted(study, "bn", 0.80 + run_index / 100, run_index=run_index)
        promoted(study, "gn", 0.90 + run_index / 100, run_index=run_index)
    return study


def test_confirmed_leaders_get_no_more_runs_and_leave_the_budget_to_a_second_look():
    plan = staged_plan(trainings=None)
    plan.groups = {}  # no refinement: what is left is a second look or a confirmation
    once = confirmed_study(runs=1)
    assert [s.stage for s in plan._planned(once.trials, left=100)] == [PROMOTE]  # second look
    twice = confirmed_study(runs=CONFIRM_RUNS)
    cost = MAX_EPOCHS - RUNG
    exact = plan._planned(twice.trials, left=cost)  # no confirmation is kept back
    assert [s.candidate.label[:11] for s in exact] == ["second look"]
    promoted(twice, "in", 0.85, label="second look: uniform:in")
    promoted(twice, "in", 0.86, run_index=1, label="second look: uniform:in")
    assert plan._planned(twice.trials, left=100) == []  # every leader has its runs


def test_refinement_screens_as_many_moves_as_the_budget_leaves_after_their_promotion():
    plan = staged_plan(trainings=None)
    study = optuna.create_study(direction="maximize")
    for choice, at_rung in (("bn", 0.5), ("gn", 0.6), ("in", 0.7)):
        screened(study, choice, at_rung)
    for run_index in range(CONFIRM_RUNS):  # the rung ranked them right; both confirmed
        promoted(study, "in", 0.9, run_index=run_index)
        promoted(study, "gn", 0.8, run_index=run_index)
    promotion = MAX_EPOCHS - RUNG
    for fitting in (1, 2, 3):
        moves = plan._planned(study.trials, left=promotion + fitting * RUNG)
        assert [(s.stage, s.round) for s in moves] == [(REFINE, 1)] * fitting
    assert plan._planned(study.trials, left=promotion + RUNG - 1) == []


def test_refinement_rounds_count_from_one_even_when_the_whole_screen_failed():
    """Every screened trial failed; a config the sampler found leads: the learned config's
    moves around it are round 1, and no second look is planned."""
    plan = staged_plan(trainings=None)
    plan.learned = cfg("gn")
    study = optuna.create_study(direction="maximize")
    step = Planned(SCREEN, uniform("bn"), rung=RUNG)
    add(study, cfg("bn"), TrialState.FAIL, step.user_attrs())
    add(study, cfg("in"), TrialState.COMPLETE, {}, value=0.9)
    moves = plan._planned(study.trials, left=100 * MAX_EPOCHS)
    assert moves and {(s.stage, s.round) for s in moves} == {(REFINE, 1)}
    plan.learned = None  # nothing to borrow from: only the leader's confirmation is left
    assert [s.stage for s in plan._planned(study.trials, left=100 * MAX_EPOCHS)] == [CONFIRM]


def test_the_evidence_ranks_ties_in_screen_order_and_ignores_unfinished_trials():
    study = optuna.create_study(direction="maximize")
    for choice, at_rung in (("bn", 0.5), ("gn", 0.5), ("in", 0.7)):
        screened(study, choice, at_rung)
    step = Planned(SCREEN, uniform("ln"), rung=RUNG)  # still training, already past its rung
    add(study, cfg("ln"), TrialState.RUNNING, step.user_attrs(), rung_value=0.9)
    ev = evidence(study)
    assert [c.params["a"] for c in ev.ranked_screen(SCREEN, 0)] == ["in", "bn", "gn"]
    assert ev.rung_value(cfg("ln")) is None
    assert [c.params["a"] for c in evidence(study, maximize=False).ranked_screen(SCREEN, 0)] == [
        "bn",
        "gn",
        "in",
    ]


def queue(study: optuna.Study, step: Planned) -> None:
    study.enqueue_trial(step.candidate.params, user_attrs=step.user_attrs())


def test_what_is_left_counts_the_retraining_and_the_running_trials_and_a_rung_in_full():
    sampler_only = Plan(max_epochs=MAX_EPOCHS, budget_epochs=RUNG - 1, n_trials=None)
    study = optuna.create_study(direction="maximize")
    queue(study, Planned(SCREEN, uniform("bn"), rung=RUNG))  # costs its whole rung
    assert sampler_only.next(study) == DONE and study.trials[0].state == TrialState.FAIL
    retrained = Plan(max_epochs=MAX_EPOCHS, budget_epochs=20, n_trials=None, retrain_epochs=9)
    study = optuna.create_study(direction="maximize")
    queue(study, Planned(PROMOTE, uniform("bn")))
    assert retrained.next(study) == RUN  # 20 - 9 kept for the retraining: one run fits
    study.optimize(objective, n_trials=1)
    queue(study, Planned(PROMOTE, uniform("gn")))
    assert retrained.next(study) == DONE  # 20 - 9 - 9 leaves 2
    busy = Plan(max_epochs=MAX_EPOCHS, budget_epochs=12, n_trials=None)
    study = optuna.create_study(direction="maximize")
    add(study, cfg("bn"), TrialState.RUNNING, Planned(PROMOTE, uniform("bn")).user_attrs())
    queue(study, Planned(PROMOTE, uniform("gn")))
    assert busy.next(study) == WAIT  # 12 - 9 running: the queued run waits for what is left


def test_a_plan_or_sampler_with_nothing_left_waits_for_running_trials_then_ends():
    budgeted = staged_plan(trainings=100)
    budgeted.groups = {}
    study = confirmed_study(runs=CONFIRM_RUNS)
    promoted(study, "in", 0.85, label="second look: uniform:in")
    promoted(study, "in", 0.86, run_index=1, label="second look: uniform:in")
    assert budgeted.next(study) == DONE
    add(study, cfg("ln"), TrialState.RUNNING, {})  # the sampler's, from before
    assert budgeted.next(study) == WAIT
    sampler = Plan(max_epochs=MAX_EPOCHS, budget_epochs=12, n_trials=None)
    study = optuna.create_study(direction="maximize")
    add(study, cfg("bn"), TrialState.RUNNING, {})
    assert sampler.next(study) == WAIT  # 3 epochs left unless it fails
    assert (
        Plan(max_epochs=MAX_EPOCHS, budget_epochs=8, n_trials=None).next(optuna.create_study())
        == DONE
    )
