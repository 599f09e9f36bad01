"""The staged plan, driven by a real Optuna study whose objective scores configs without training
(so every decision can be checked), and the slot groups refinement moves change."""

from __future__ import annotations

import optuna
import pytest

from autonorm import _trial_keys as keys
from autonorm.report import choice_certainty, config_runs
from autonorm.report._winners import student_t_cdf
from autonorm.search._plan import (
    CONFIRM,
    DONE,
    PROMOTE,
    REFINE,
    RUN,
    SCREEN,
    Candidate,
    Evidence,
    Plan,
    reuse_finished,
)
from autonorm.search_spaces import slot_groups

MAX_EPOCHS = 3
PARAMS = {"a": ["bn", "gn", "in"], "b": ["bn", "gn", "in"], "c": ["bn", "gn", "in"]}
#: per-slot quality of each choice: the best config mixes families (a: in, b: in, c: gn)
QUALITY = {"a": {"bn": 0.0, "gn": 0.2, "in": 0.3}, "b": {"bn": 0.0, "gn": 0.1, "in": 0.3}}
QUALITY["c"] = {"bn": 0.1, "gn": 0.3, "in": 0.05}


def objective(trial: optuna.Trial) -> float:
    params = {name: trial.suggest_categorical(name, labels) for name, labels in PARAMS.items()}
    score = sum(QUALITY[name][choice] for name, choice in params.items())
    epochs = trial.user_attrs.get(keys.RUNG_EPOCHS) or MAX_EPOCHS
    for epoch in range(epochs):
        trial.report(score * (epoch + 1) / MAX_EPOCHS, epoch)
    trial.set_user_attr(keys.EPOCHS, epochs)
    if keys.RUNG_EPOCHS in trial.user_attrs:
        raise optuna.TrialPruned("rung")
    return score


def uniform(choice: str) -> Candidate:
    return Candidate(f"uniform:{choice}", dict.fromkeys(PARAMS, choice))


def run(plan: Plan) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    for step in plan.screen():
        study.enqueue_trial(step.candidate.params, user_attrs=step.user_attrs())
    for _ in range(100):
        if plan.next(study) != RUN:
            break
        study.optimize(objective, n_trials=1)
    return study


def staged_plan(trainings: float | None, n_trials: int | None = None) -> Plan:
    return Plan(
        max_epochs=MAX_EPOCHS,
        budget_epochs=None if trainings is None else trainings * MAX_EPOCHS,
        n_trials=n_trials,
        maximize=True,
        baselines=[uniform("bn"), uniform("gn"), uniform("in")],
        groups={"slot:a": ["a"], "slot:b": ["b"], "slot:c": ["c"]},
    )


def stages(study: optuna.Study) -> list[str]:
    return [t.user_attrs.get(keys.STAGE) for t in study.trials]


def test_the_plan_screens_promotes_refines_and_confirms_within_the_budget():
    plan = staged_plan(trainings=6)
    study = run(plan)
    assert stages(study)[:5] == [SCREEN, SCREEN, SCREEN, PROMOTE, PROMOTE]
    promoted = [t.params for t in study.trials if t.user_attrs[keys.STAGE] == PROMOTE][:2]
    assert promoted == [dict.fromkeys(PARAMS, "in"), dict.fromkeys(PARAMS, "gn")]  # screen's top 2
    assert REFINE in stages(study) and CONFIRM in stages(study)
    assert plan.spent(study.trials) <= 6 * MAX_EPOCHS
    assert plan.next(study) == DONE
    # refinement found the mixed config, better than every uniform one
    best = config_runs(study)[0]
    assert best.trials[0].params == {"a": "in", "b": "in", "c": "gn"}
    assert best.mean == pytest.approx(0.9)


def test_a_budget_of_the_grid_leaves_no_room_for_refinement_but_confirms_the_leader():
    plan = staged_plan(trainings=3)  # 3 screens (3 epochs) + 2 promotions (6 epochs) = 9
    study = run(plan)
    assert stages(study) == [SCREEN, SCREEN, SCREEN, PROMOTE, PROMOTE]
    assert plan.spent(study.trials) == 9 and plan.next(study) == DONE


def test_n_trials_alone_bounds_the_plan_and_the_sampler_takes_over():
    plan = staged_plan(trainings=None, n_trials=40)
    study = run(plan)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 40
    assert any(keys.STAGE not in t.user_attrs for t in finished)  # the sampler's, after the plan


def test_the_screen_leaves_room_for_the_promotions_and_random_configs_come_last():
    plan = staged_plan(trainings=8 / 3)  # 8 epochs: 2 screens + 2 promotions of 3 epochs
    assert [s.candidate.label for s in plan.screen()] == ["uniform:bn", "uniform:gn"]
    explore = [Candidate("random:1", {"a": "bn", "b": "in", "c": "gn"})]
    plan = staged_plan(trainings=6)
    plan.baselines += explore
    plan.explore = 1
    labels = [s.candidate.label for s in plan.screen()]
    assert labels == ["uniform:bn", "uniform:gn", "uniform:in", "random:1"]
    plan.budget_epochs = 3 + 2 * 3 + 3  # three screens, two promotions and a confirmation
    assert [s.candidate.label for s in plan.screen()] == labels[:3]
    plan.budget_epochs = 1 + 2 * 3  # too little for two screens: the baselines train in full
    assert {s.stage for s in plan.screen()} == {PROMOTE}


def test_config_runs_rank_by_mean_and_the_certainty_says_how_sure():
    study = optuna.create_study(direction="maximize")
    for value, params in [(0.9, "x"), (0.5, "x"), (0.8, "y"), (0.8, "y")]:
        study.add_trial(
            optuna.trial.create_trial(
                params={"p": params},
                distributions={"p": optuna.distributions.CategoricalDistribution(["x", "y"])},
                value=value,
            )
        )
    runs = config_runs(study)
    assert [r.trials[0].params["p"] for r in runs] == ["y", "x"]  # 0.8 mean beats 0.7
    assert runs[0].std == 0.0 and runs[1].std == pytest.approx(0.2828, abs=1e-4)
    certainty = choice_certainty(runs, maximize=True)
    assert certainty["gap"] == pytest.approx(0.1)
    # spread pooled over both configs (2 degrees of freedom): 0.2, the gap's noise 0.2, and
    # Student's t with 2 degrees of freedom at t = 0.5: 0.5 + 0.5 / (2 sqrt(2.25))
    assert certainty["noise"] == pytest.approx(0.2)
    assert certainty["p_better"] == pytest.approx(2 / 3)


def test_student_t_cdf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for freedom in range(1, 31):
        for t in (-6.0, -2.228, -1.0, -0.3, 0.0, 0.4, 1.0, 2.0, 3.4, 25.0):
            assert student_t_cdf(t, freedom) == pytest.approx(stats.t.cdf(t, freedom), abs=1e-12)
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy
    with pytest.raises(ValueError, match="`freedom` must be a positive int"):
        student_t_cdf(1.0, 0)


def test_a_repeated_proposal_reuses_the_finished_result():
    study = optuna.create_study(direction="maximize")
    params = {"a": (["bn", "gn"], ["a"])}
    study.enqueue_trial({"a": "gn"})
    study.optimize(lambda t: reuse_finished(study, t, params) or 0.7, n_trials=1)
    study.enqueue_trial({"a": "gn"})
    study.optimize(lambda t: reuse_finished(study, t, params) or 0.1, n_trials=1)
    assert study.trials[1].value == 0.7
    assert study.trials[1].user_attrs[keys.REUSED_FROM] == 0
    assert len(config_runs(study)[0].trials) == 1  # a reused result is not another run


def test_slot_groups_by_stage_and_role():
    resnet = ["bn1"] + [f"layer{s}.0.bn{i}" for s in (1, 2) for i in (1, 2)]
    resnet.append("layer2.0.downsample.1")
    groups = slot_groups(resnet)
    assert groups["role:shortcut"] == ["layer2.0.downsample.1"]
    assert groups["role:stem"] == ["bn1"]
    assert groups["stage:layer1"] == ["layer1.0.bn1", "layer1.0.bn2"]
    llama = [
        f"model.layers.{i}.{n}"
        for i in range(4)
        for n in ("input_layernorm", "post_attention_layernorm")
    ]
    llama.append("model.norm")
    groups = slot_groups(llama)
    assert groups["role:attention"] == [f"model.layers.{i}.input_layernorm" for i in range(4)]
    assert groups["role:mlp"] == [f"model.layers.{i}.post_attention_layernorm" for i in range(4)]
    assert groups["role:head"] == ["model.norm"]
    assert groups["stage:early"] == llama[:4]


def test_without_a_learn_pass_refinement_borrows_what_the_switchable_screen_weighed_highest():
    """The screened trial of uniform SwitchableNorm records its layers' favourite choices; the
    first refinement moves change the incumbent group by group towards them."""
    favourites = {"a": "in", "b": "in", "c": "gn"}  # the best mix, which no baseline holds

    def objective_with_mixing(trial: optuna.Trial) -> float:
        if trial.user_attrs.get(keys.BASELINE) == "uniform:gn":  # stands for uniform SN
            trial.set_user_attr(keys.SWITCHABLE_CHOICES, favourites)
        return objective(trial)

    plan = staged_plan(trainings=6)
    plan.mixed_params = dict  # parameters named after their slots
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    for step in plan.screen():
        study.enqueue_trial(step.candidate.params, user_attrs=step.user_attrs())
    while plan.next(study) == RUN:
        study.optimize(objective_with_mixing, n_trials=1)
    moves = [t for t in study.trials if t.user_attrs[keys.STAGE] == REFINE]
    # the incumbent is uniform "in": only slot c differs from the favourites
    assert moves[0].user_attrs[keys.BASELINE] == "refine: slot:c <- switchable weights"
    assert moves[0].params == favourites
    assert config_runs(study)[0].trials[0].params == favourites
    # with a learned config, that comes first and the screen's weights are not read
    plan.learned = {"a": "bn", "b": "bn", "c": "bn"}
    assert plan._moves(Evidence(study.trials, plan.rung, True), study.trials)[0].label.endswith(
        "<- learned"
    )
