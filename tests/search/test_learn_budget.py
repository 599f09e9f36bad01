"""A learn pass (``warm_start="learn"``) trains one full run before the trials: its epochs count
against the compute budget (``budget.trainings``), in the plan's decisions, in the study's record
and in the summary (:func:`~autonorm.report.spent_epochs`)."""

from __future__ import annotations

import optuna
import pytest

import autonorm
from autonorm import Budget
from autonorm import _trial_keys as keys
from autonorm.report import spent_epochs
from autonorm.search._plan import RUN, Plan
from autonorm.search._planned import SCREEN
from tests.lightning_models import TinyConvNet, TinyDataModule
from tests.search.test_plan_directions import CROSSING, MAX_EPOCHS, four_baselines, run_plan


def trial_epochs(trials) -> int:
    """Epochs the trials trained (the learn pass is no trial)."""
    return sum(int(t.user_attrs.get(keys.EPOCHS, 0)) for t in trials if t.state.is_finished())


# -- the plan on its own ---------------------------------------------------------------------


def run_full_trials(plan: Plan) -> optuna.Study:
    """A plan without baselines: every trial the sampler's, a full training each."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_categorical("a", ["bn", "gn", "in"])
        trial.set_user_attr(keys.EPOCHS, plan.max_epochs)
        return 0.5

    for _ in range(50):
        if plan.next(study) != RUN:
            break
        study.optimize(objective, n_trials=1)
    return study


def test_the_learn_pass_takes_exactly_its_epochs_from_the_trials_share():
    budget = 5 * MAX_EPOCHS
    without = Plan(max_epochs=MAX_EPOCHS, budget_epochs=budget, n_trials=None)
    learned = Plan(
        max_epochs=MAX_EPOCHS, budget_epochs=budget, n_trials=None, learn_epochs=MAX_EPOCHS
    )
    plain, after_learning = run_full_trials(without), run_full_trials(learned)
    assert trial_epochs(plain.trials) == budget
    assert trial_epochs(after_learning.trials) == budget - MAX_EPOCHS, (
        "the learn pass's epochs must be taken from the trials' share of the budget"
    )
    assert learned.spent(after_learning.trials) == budget  # the learn pass counted as spent
    assert spent_epochs(after_learning.trials, MAX_EPOCHS) == budget


def test_the_screen_keeps_the_learn_pass_out_of_its_room():
    """At 3 trainings (27 epochs) four screens (12) and two promotions (12) fit; after a learn
    pass (9) only two screens do."""
    plan = four_baselines(trainings=3)
    assert [s.stage for s in plan.screen()] == [SCREEN] * 4
    plan.learn_epochs = MAX_EPOCHS
    assert [s.candidate.label for s in plan.screen()] == ["uniform:bn", "uniform:gn"], (
        "the screen must leave the learn pass's epochs out of its room"
    )


@pytest.mark.parametrize("trainings", [4, 7])
def test_a_staged_plan_after_a_learn_pass_stays_within_the_budget(trainings):
    budget = trainings * MAX_EPOCHS
    plain = run_plan(four_baselines(trainings), CROSSING, "maximize")
    plan = four_baselines(trainings)
    plan.learn_epochs = MAX_EPOCHS
    study = run_plan(plan, CROSSING, "maximize")
    trained = trial_epochs(study.trials)
    assert plan.spent(study.trials) == trained + MAX_EPOCHS, "the learn pass is spent compute"
    assert trained <= budget - MAX_EPOCHS, (
        f"the trials trained {trained} epochs, more than the {budget - MAX_EPOCHS} the learn "
        "pass left of the budget"
    )
    assert trained < trial_epochs(plain.trials)


# -- real searches ---------------------------------------------------------------------------


def search(tmp_path, name: str, **options):
    defaults = dict(
        n_trials=None, out_dir=tmp_path / name, seed=0, space="minimal", sampler="random"
    )
    return autonorm.search(TinyConvNet, TinyDataModule(), **{**defaults, **options})


def test_a_learned_search_counts_its_learn_pass_against_the_trainings(tmp_path):
    """The staged search: the learn pass (3 epochs) and the trials together stay within the
    5 trainings of 3 epochs; the study, the summary and ``spent_epochs`` count the learn pass."""
    result = search(
        tmp_path,
        "staged",
        warm_start="learn",
        budget=Budget(trainings=5),
        trainer_kwargs={"max_epochs": 3},
    )
    trained = trial_epochs(result.study.trials)
    assert 0 < trained <= 15 - 3, f"the trials trained {trained} of 15 epochs after the learn pass"
    info = result.study.user_attrs["autonorm"]
    assert info["learn_epochs"] == 3, "the study must record the learn pass's epochs"
    assert info["budget_epochs"] == 15
    compute = result.summary["compute"]
    assert compute["epochs"] == spent_epochs(result.study.trials, 3) == trained + 3
    assert compute["trainings"] == pytest.approx((trained + 3) / 3)
    assert compute["trainings"] <= compute["budget_trainings"] == 5


def test_at_the_same_budget_a_learn_pass_leaves_the_trials_its_epochs_fewer(tmp_path):
    """Full runs only (two objectives: no staged plan, every trial trains the whole schedule):
    at 4 trainings of 2 epochs the trials train 8 epochs without a learn pass, 6 after it."""
    options = dict(
        budget=Budget(trainings=4),
        trainer_kwargs={"max_epochs": 2},
        objectives=["metric", "params"],
    )
    plain = search(tmp_path, "plain", warm_start=True, **options)
    learned = search(tmp_path, "learned", warm_start="learn", **options)
    assert trial_epochs(plain.study.trials) == 8
    assert trial_epochs(learned.study.trials) == trial_epochs(plain.study.trials) - 2, (
        "the learn pass's 2 epochs must come out of the trials' share of the budget"
    )
    assert learned.study.user_attrs["autonorm"]["learn_epochs"] == 2
    for result in (plain, learned):
        assert result.summary["compute"]["epochs"] == 8  # the whole budget, learn pass included
