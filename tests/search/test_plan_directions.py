"""The staged plan ranks in the study's direction: the same scenario, with values ``v`` when the
study maximizes and ``-v`` when it minimizes (a loss), takes the same decisions.

The learning curves are noisy and cross: a slow starter trails at the rung and ends best, a
fast starter leads at the rung and ends behind. The plan trusts the rung (it promotes the best
at the rung, and a refinement move only when its rung value beats the incumbent's), so each
crossing shows on which side of the rung the plan ranked; a plan that ranks a minimizing study
as if it maximized promotes the worst screened configs and turns the refinement check over.
"""

from __future__ import annotations

import random

import optuna
import pytest

import autonorm
from autonorm import Budget
from autonorm import _trial_keys as keys
from autonorm.report import config_runs
from autonorm.search._plan import DONE, RUN, Evidence, Plan
from autonorm.search._planned import CONFIRM, PROMOTE, REFINE, SCREEN, Candidate, continue_values
from tests.lightning_models import TinyConvNet, TinyDataModule
from tests.search.test_plan import PARAMS, of_stage, stages, uniform

#: slots a, b, c; each choice named by its first letter in a config's short name (``"bgi"``)
CHOICES = ["bn", "gn", "in", "ln", "rms", "sn"]
SPACE = dict.fromkeys(PARAMS, CHOICES)
MAX_EPOCHS = 9  # rung: 3 epochs
RUNG = 3
#: the rung's share of the schedule: a curve ``final * progress ** power`` is at
#: ``final * (1/3) ** power`` there (power 0.5: 0.577 of its end; 1: 0.333; 2: 0.111; 3: 0.037)
FAST, STEADY, SLOW, SLOWEST = 0.5, 1.0, 2.0, 3.0
#: the noise every config's k-th run shares (same seed), and each config's own: the margins at
#: the rung and at the end below are 0.05 or more, many times the own noise's spread
SHARED_NOISE, OWN_NOISE = 0.03, 0.005
#: any config a scenario does not name: mediocre and fast (a plan that ranks the wrong way may
#: train configs no scenario planned for; they must not end the run before its assertions)
OTHER = (0.2, FAST)


def key(params: dict[str, str]) -> str:
    """``"bgi"``: the first letter of each slot's choice."""
    return "".join(params[name][0] for name in SPACE)


def config(short: str) -> dict[str, str]:
    names = {choice[0]: choice for choice in CHOICES}
    return {name: names[letter] for name, letter in zip(SPACE, short, strict=True)}


def curve(curves: dict[str, tuple[float, float]], params: dict[str, str], run: int, epoch: int):
    """The value after ``epoch`` of the config's ``run``-th run (its seed: the run index)."""
    final, power = curves.get(key(params), OTHER)
    shared = random.Random(f"{run}/{epoch}").gauss(0, SHARED_NOISE)
    own = random.Random(f"{key(params)}/{run}/{epoch}").gauss(0, OWN_NOISE)
    return final * ((epoch + 1) / MAX_EPOCHS) ** power + shared + own


def run_plan(plan: Plan, curves: dict[str, tuple[float, float]], direction: str) -> optuna.Study:
    """Drive ``plan`` to its end on a study in ``direction``; each trial reports ``sign * v``
    from its run's seed, from the epoch it continues to its rung or the end."""
    sign = 1.0 if direction == "maximize" else -1.0
    plan.maximize = direction == "maximize"

    def objective(trial: optuna.Trial) -> float:
        params = {name: trial.suggest_categorical(name, labels) for name, labels in SPACE.items()}
        attrs = trial.user_attrs
        run, start = attrs.get(keys.RUN_INDEX, 0), attrs.get(keys.START_EPOCH, 0)
        stop = attrs.get(keys.RUNG_EPOCHS) or MAX_EPOCHS
        if start:
            continue_values(trial.study, trial)
        for epoch in range(start, stop):
            trial.report(sign * curve(curves, params, run, epoch), epoch)
        trial.set_user_attr(keys.EPOCHS, stop - start)
        if keys.RUNG_EPOCHS in attrs:
            raise optuna.TrialPruned("rung")
        return sign * curve(curves, params, run, MAX_EPOCHS - 1)

    study = optuna.create_study(direction=direction, sampler=optuna.samplers.RandomSampler(0))
    for step in plan.screen():
        study.enqueue_trial(step.candidate.params, user_attrs=step.user_attrs())
    for _ in range(100):
        if plan.next(study) != RUN:
            break
        study.optimize(objective, n_trials=1)
    return study


def four_baselines(trainings: float) -> Plan:
    """Uniform bn, gn, in and one random config, screened in that order; groups: one a slot."""
    return Plan(
        max_epochs=MAX_EPOCHS,
        budget_epochs=trainings * MAX_EPOCHS,
        n_trials=None,
        baselines=[
            uniform("bn"),
            uniform("gn"),
            uniform("in"),
            Candidate("random:1", config("bgi")),
        ],
        groups={"slot:a": ["a"], "slot:b": ["b"], "slot:c": ["c"]},
    )


def rung_value(trial: optuna.trial.FrozenTrial) -> float:
    return trial.intermediate_values[RUNG - 1]


def promoted_in_round(study: optuna.Study, round_: int) -> list[str]:
    return [
        key(t.params)
        for t in of_stage(study, PROMOTE)
        if int(t.user_attrs.get(keys.ROUND, 0)) == round_
    ]


DIRECTIONS = pytest.mark.parametrize("direction", ["maximize", "minimize"])

#: The screen (rung values, of the maximized curve): in 0.46, random bgi 0.40, bn 0.17, gn 0.11
#: (a slow starter that ends best of the screen, 0.95). Refinement moves around the incumbent
#: (in), borrowing from the next two at the rung (bgi, bn): round 1 screens bii 0.35 (the best
#: move at the rung, still below the incumbent's 0.46), igi 0.10 (slow: ends at 0.90, above the
#: incumbent, but last at the rung) and ibi 0.29; round 2 screens iib 0.56 (fast: above the
#: incumbent at the rung, below it at the end, 0.78).
CROSSING = {
    "iii": (0.80, FAST),
    "bgi": (0.70, FAST),
    "bbb": (0.30, FAST),
    "ggg": (0.95, SLOW),
    "bii": (0.60, FAST),
    "igi": (0.90, SLOW),
    "ibi": (0.50, FAST),
    "iib": (0.78, 0.3),
}


@DIRECTIONS
def test_crossing_curves_are_promoted_by_the_rung_in_either_direction(direction):
    plan = four_baselines(trainings=7)
    study = run_plan(plan, CROSSING, direction)
    sign = 1.0 if direction == "maximize" else -1.0
    screened = {key(t.params): sign * rung_value(t) for t in of_stage(study, SCREEN)}
    assert list(screened) == ["bbb", "ggg", "iii", "bgi"]
    assert sorted(screened, key=screened.get, reverse=True) == ["iii", "bgi", "bbb", "ggg"]

    # the first promotions: the rung's best two, each continuing its screened run; not the
    # rung's worst (the slow starter gn, which would end best of the screen: the rung is trusted)
    first = promoted_in_round(study, 0)
    assert first == ["iii", "bgi"], (
        f"{direction}: the screen's best two at the rung (iii, bgi) must be promoted, got {first}"
    )
    for trial in of_stage(study, PROMOTE):
        assert study.trials[trial.user_attrs[keys.CONTINUES]].params == trial.params

    # refinement round 1: its best move at the rung (bii) does not beat the incumbent (iii) at
    # the rung, so none is promoted, not even igi, which would end above the incumbent
    round_1 = [key(t.params) for t in of_stage(study, REFINE) if t.user_attrs[keys.ROUND] == 1]
    assert round_1 == ["bii", "igi", "ibi"]
    assert promoted_in_round(study, 1) == [], (
        f"{direction}: no move of round 1 beats the incumbent at the rung, yet "
        f"{promoted_in_round(study, 1)} was promoted"
    )
    # round 2: its move (iib) beats the incumbent at the rung: promoted, continuing its screen
    round_2 = [key(t.params) for t in of_stage(study, REFINE) if t.user_attrs[keys.ROUND] == 2]
    assert round_2 == ["iib"]
    assert promoted_in_round(study, 2) == ["iib"], (
        f"{direction}: iib beats the incumbent at the rung and must be promoted, got "
        f"{promoted_in_round(study, 2)}"
    )
    # ... and ends below it: the incumbent stays, both leaders confirmed with the next seed
    confirmed = [(key(t.params), t.user_attrs[keys.RUN_INDEX]) for t in of_stage(study, CONFIRM)]
    assert confirmed == [("iii", 1), ("iib", 1)]
    assert key(config_runs(study)[0].trials[0].params) == "iii"
    assert stages(study) == [SCREEN] * 4 + [PROMOTE] * 2 + [REFINE] * 4 + [
        PROMOTE,
        CONFIRM,
        CONFIRM,
    ]
    assert plan.spent(study.trials) <= 7 * MAX_EPOCHS
    assert plan.next(study) == DONE


#: The rung misranks the promoted configs: in leads at the rung (0.46) but ends at 0.80, bgi
#: rises steadily (rung 0.32, end 0.95); so the rung is not trusted and the best screened
#: config without a full run, bn (rung 0.23), gets a second look; gn, the slowest (rung 0.04),
#: is the worst at the rung and gets none.
MISRANKED = {
    "iii": (0.80, FAST),
    "bgi": (0.95, STEADY),
    "bbb": (0.40, FAST),
    "ggg": (1.00, SLOWEST),
}


@DIRECTIONS
def test_a_second_look_goes_to_the_next_best_at_the_rung_in_either_direction(direction):
    plan = four_baselines(trainings=6)
    study = run_plan(plan, MISRANKED, direction)
    promoted = [key(t.params) for t in of_stage(study, PROMOTE)]
    assert promoted[:2] == ["iii", "bgi"], f"{direction}: got first promotions {promoted[:2]}"
    looks = [t for t in of_stage(study, PROMOTE) if "second look" in t.user_attrs[keys.BASELINE]]
    assert [key(t.params) for t in looks] == ["bbb"], (
        f"{direction}: the second look must go to the best screened config without a full run "
        f"(bbb), got {[key(t.params) for t in looks]}"
    )
    assert "rung fidelity -1.00" in looks[0].user_attrs[keys.BASELINE]
    assert key(config_runs(study)[0].trials[0].params) == "bgi"
    assert plan.spent(study.trials) <= 6 * MAX_EPOCHS


def decisions(study: optuna.Study) -> list[tuple]:
    """What the plan asked of each trial: stage, config, round, run, the trial it continues."""
    return [
        (
            t.user_attrs.get(keys.STAGE),
            key(t.params),
            t.user_attrs.get(keys.ROUND),
            t.user_attrs.get(keys.RUN_INDEX),
            t.user_attrs.get(keys.CONTINUES),
        )
        for t in study.trials
    ]


@pytest.mark.parametrize(
    ("curves", "trainings"),
    [(CROSSING, 7), (MISRANKED, 6), (CROSSING, 4)],
    ids=["crossing", "misranked", "crossing-tight-budget"],
)
def test_a_minimizing_study_of_negated_values_takes_the_same_decisions(curves, trainings):
    """Every trial, its stage, round, run, the run it continues and its values, mirrored."""
    maximized = run_plan(four_baselines(trainings), curves, "maximize")
    minimized = run_plan(four_baselines(trainings), curves, "minimize")
    assert decisions(minimized) == decisions(maximized), "the directions decided otherwise"
    for mine, theirs in zip(maximized.trials, minimized.trials, strict=True):
        assert mine.state == theirs.state and mine.user_attrs == theirs.user_attrs
        assert mine.intermediate_values == {s: -v for s, v in theirs.intermediate_values.items()}
        assert mine.value == (None if theirs.value is None else -theirs.value)


@DIRECTIONS
def test_the_evidence_ranks_the_rung_and_checks_a_move_in_the_study_s_direction(direction):
    """The refinement check on its own, on hand-made rung values: the best move is the one best
    at the rung in the study's direction, promoted only when it beats the incumbent there."""
    sign = 1.0 if direction == "maximize" else -1.0
    dist = {n: optuna.distributions.CategoricalDistribution(c) for n, c in SPACE.items()}

    def screened(short: str, stage: str, value: float, round_: int = 0):
        return optuna.trial.create_trial(
            params=config(short),
            distributions=dist,
            state=optuna.trial.TrialState.PRUNED,
            intermediate_values={step: sign * value * (step + 1) / RUNG for step in range(RUNG)},
            user_attrs={
                keys.STAGE: stage,
                keys.BASELINE: short,
                keys.ROUND: round_,
                keys.RUN_INDEX: 0,
                keys.RUNG_EPOCHS: RUNG,
                keys.EPOCHS: 3,
            },
        )

    trials = [
        screened("iii", SCREEN, 0.50),
        screened("bbb", SCREEN, 0.30),
        screened("bii", REFINE, 0.45, round_=1),
        screened("ibi", REFINE, 0.10, round_=1),
        screened("iib", REFINE, 0.55, round_=2),
        screened("gii", REFINE, 0.50, round_=3),  # a tie is no win
    ]
    evidence = Evidence(trials, RUNG, maximize=sign > 0)
    incumbent = Candidate("uniform:in", config("iii"))
    assert [key(c.params) for c in evidence.ranked_screen(SCREEN, 0)] == ["iii", "bbb"]
    best_1 = evidence.ranked_screen(REFINE, 1)
    assert [key(c.params) for c in best_1] == ["bii", "ibi"]
    assert not evidence.beats_at_rung(best_1[0], incumbent), f"{direction}: 0.45 beat 0.50"
    assert not evidence.beats_at_rung(best_1[1], incumbent), f"{direction}: 0.10 beat 0.50"
    [best_2] = evidence.ranked_screen(REFINE, 2)
    assert evidence.beats_at_rung(best_2, incumbent), f"{direction}: 0.55 did not beat 0.50"
    [tie] = evidence.ranked_screen(REFINE, 3)
    assert not evidence.beats_at_rung(tie, incumbent)


def test_a_val_loss_search_promotes_its_lowest_screened_configs(tmp_path):
    """A real search on ``val_loss`` (mode ``min``, the default): the first promotions are the
    two lowest losses at the rung (and the own norms, never left out), lowest first."""
    result = autonorm.search(
        TinyConvNet, TinyDataModule(), n_trials=None, trainer_kwargs={"max_epochs": 3},
        out_dir=tmp_path, seed=0, space="cnn", budget=Budget(trainings=5),
    )  # fmt: skip
    info = result.study.user_attrs["autonorm"]
    assert (info["monitor"], info["mode"]) == ("val_loss", "min")
    rung = info["rung_epochs"]
    at_rung = {}
    for trial in of_stage(result.study, SCREEN):
        if trial.user_attrs[keys.ROUND] == 0:
            steps = [s for s in trial.intermediate_values if s >= rung - 1]
            at_rung[trial.user_attrs[keys.BASELINE]] = trial.intermediate_values[min(steps)]
    assert len(at_rung) >= 4, at_rung  # more screened configs than promotions
    lowest = sorted(at_rung, key=at_rung.get)[:2]
    expected = lowest + ([] if "own norms" in lowest else ["own norms"])
    first = [
        t.user_attrs[keys.BASELINE]
        for t in of_stage(result.study, PROMOTE)
        if t.user_attrs[keys.ROUND] == 0 and "second look" not in t.user_attrs[keys.BASELINE]
    ]
    assert first == expected, (
        f"a val_loss search must promote the lowest losses at the rung {expected}, got {first} "
        f"(rung values: {at_rung})"
    )
