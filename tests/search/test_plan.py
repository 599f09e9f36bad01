"""The staged plan, driven by a real Optuna study whose objective scores configs without training
(so every decision can be checked), and the slot groups refinement moves change."""

from __future__ import annotations

import math
import random

import optuna
import pytest

from autonorm import _trial_keys as keys
from autonorm.report import choice_certainty, config_runs
from autonorm.report._winners import student_t_cdf
from autonorm.search._plan import DONE, RUN, Evidence, Plan, reuse_finished
from autonorm.search._planned import (
    CONFIRM,
    PROMOTE,
    REFINE,
    SCREEN,
    Candidate,
    Continued,
    Planned,
    continue_values,
)
from autonorm.search_spaces import slot_groups
from tests.report.studies import paired_runs_study

MAX_EPOCHS = 9  # rung: 3 epochs
PARAMS = {"a": ["bn", "gn", "in"], "b": ["bn", "gn", "in"], "c": ["bn", "gn", "in"]}
#: per-slot quality of each choice: the best config mixes families (a: in, b: in, c: gn)
QUALITY = {"a": {"bn": 0.0, "gn": 0.2, "in": 0.3}, "b": {"bn": 0.0, "gn": 0.1, "in": 0.3}}
QUALITY["c"] = {"bn": 0.1, "gn": 0.3, "in": 0.05}
#: how late a config's curve rises (``progress ** power``; default 0.5: fast): a slow starter
#: trails at the rung, not at the end
POWER: dict[tuple[str, ...], float] = {}
#: the noise every config's k-th run shares (same seed: common random numbers), and its own
SHARED_NOISE, OWN_NOISE = 0.03, 0.002


def curve(params: dict[str, str], run: int, epoch: int) -> float:
    """A noisy learning curve: the config's quality reached at the last epoch, early fast for
    most configs and late for the slow starters of :data:`POWER`, plus seed noise mostly
    shared by all configs."""
    final = sum(QUALITY[name][choice] for name, choice in params.items())
    power = POWER.get(tuple(params.values()), 0.5)
    shared = random.Random(f"{run}/{epoch}").gauss(0, SHARED_NOISE)
    own = random.Random(f"{sorted(params.items())}/{run}/{epoch}").gauss(0, OWN_NOISE)
    return final * ((epoch + 1) / MAX_EPOCHS) ** power + shared + own


def objective(trial: optuna.Trial, sign: float = 1.0) -> float:
    """Train the config as the plan asked: its run's seed, from the epoch it continues, to its
    rung or the end (``sign`` -1: the values are losses)."""
    params = {name: trial.suggest_categorical(name, labels) for name, labels in PARAMS.items()}
    attrs = trial.user_attrs
    run, start = attrs.get(keys.RUN_INDEX, 0), attrs.get(keys.START_EPOCH, 0)
    stop = attrs.get(keys.RUNG_EPOCHS) or MAX_EPOCHS
    if start:
        continue_values(trial.study, trial)
    for epoch in range(start, stop):
        trial.report(sign * curve(params, run, epoch), epoch)
    trial.set_user_attr(keys.EPOCHS, stop - start)
    if keys.RUNG_EPOCHS in attrs:
        raise optuna.TrialPruned("rung")
    return sign * curve(params, run, MAX_EPOCHS - 1)


def uniform(choice: str, incumbent: bool = False) -> Candidate:
    label = "own norms" if incumbent else f"uniform:{choice}"
    return Candidate(label, dict.fromkeys(PARAMS, choice), incumbent)


def run(plan: Plan, direction: str = "maximize") -> optuna.Study:
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.RandomSampler(0))
    for step in plan.screen():
        study.enqueue_trial(step.candidate.params, user_attrs=step.user_attrs())
    sign = 1.0 if direction == "maximize" else -1.0
    for _ in range(100):
        if plan.next(study) != RUN:
            break
        study.optimize(lambda t: objective(t, sign), n_trials=1)
    return study


def staged_plan(
    trainings: float | None, n_trials: int | None = None, own: str | None = None
) -> Plan:
    baselines = [uniform("bn"), uniform("gn"), uniform("in")]
    if own is not None:  # the model's own norms: the incumbent, screened first
        baselines = [uniform(own, incumbent=True)] + [c for c in baselines if own not in c.label]
    return Plan(
        max_epochs=MAX_EPOCHS,
        budget_epochs=None if trainings is None else trainings * MAX_EPOCHS,
        n_trials=n_trials,
        maximize=True,
        baselines=baselines,
        groups={"slot:a": ["a"], "slot:b": ["b"], "slot:c": ["c"]},
    )


def stages(study: optuna.Study) -> list[str]:
    return [t.user_attrs.get(keys.STAGE) for t in study.trials]


def of_stage(study: optuna.Study, stage: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.user_attrs.get(keys.STAGE) == stage]


@pytest.fixture(autouse=True)
def _no_slow_starters():
    saved = {name: dict(q) for name, q in QUALITY.items()}
    yield
    POWER.clear()
    QUALITY.update(saved)


def test_the_plan_screens_promotes_refines_and_confirms_within_the_budget():
    plan = staged_plan(trainings=6)
    study = run(plan)
    assert stages(study)[:5] == [SCREEN, SCREEN, SCREEN, PROMOTE, PROMOTE]
    promoted = [t.params for t in of_stage(study, PROMOTE)][:2]
    assert promoted == [dict.fromkeys(PARAMS, "in"), dict.fromkeys(PARAMS, "gn")]  # screen's top 2
    assert REFINE in stages(study) and CONFIRM in stages(study)
    assert plan.spent(study.trials) <= 6 * MAX_EPOCHS
    assert plan.next(study) == DONE
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    # refinement found the mixed config, better than every uniform one
    best = config_runs(study)[0]
    assert best.trials[0].params == {"a": "in", "b": "in", "c": "gn"}
    assert best.mean == pytest.approx(0.9, abs=0.1)


def test_a_promotion_continues_its_screened_run_and_costs_only_the_rest():
    plan = staged_plan(trainings=6)
    study = run(plan)
    for promoted in of_stage(study, PROMOTE):
        screened = study.trials[promoted.user_attrs[keys.CONTINUES]]
        assert screened.user_attrs[keys.STAGE] in (SCREEN, REFINE)
        assert screened.params == promoted.params
        assert promoted.user_attrs[keys.START_EPOCH] == plan.rung == 3
        assert promoted.user_attrs[keys.EPOCHS] == MAX_EPOCHS - plan.rung  # only the rest
        # its curve is the whole run's: the screened epochs, then its own
        assert sorted(promoted.intermediate_values) == list(range(MAX_EPOCHS))
        assert promoted.intermediate_values[2] == screened.intermediate_values[2]
    # the continued runs are what paid for the confirmations: every leader has two paired runs
    paired = [r for r in config_runs(study) if sorted(r.run_indices) == [0, 1]]
    assert len(paired) == 2 and config_runs(study)[0] in paired
    assert {t.user_attrs[keys.RUN_INDEX] for t in of_stage(study, CONFIRM)} == {1}


def test_the_model_s_own_norms_always_train_in_full_and_a_slow_starter_is_kept():
    """Own norms trail at the rung (a slow starter, as LayerNorm in a pre-LN transformer) but
    end best: they still get their full run, and the search keeps them."""
    POWER[("bn", "bn", "bn")] = 3.0
    for q in QUALITY.values():
        q["bn"] = max(q.values()) + 0.02
    plan = staged_plan(trainings=4, own="bn")
    study = run(plan)
    ranked = Evidence(study.trials, plan.rung, True).ranked_screen(SCREEN, 0)
    assert ranked[-1].label == "own norms"  # last at the rung
    own = [t for t in of_stage(study, PROMOTE) if t.user_attrs.get(keys.INCUMBENT)]
    assert len(own) == 1 and own[0].state == optuna.trial.TrialState.COMPLETE
    assert config_runs(study)[0].label == "own norms"
    assert plan.spent(study.trials) <= 4 * MAX_EPOCHS


def test_a_challenger_replaces_the_own_norms_only_on_paired_evidence():
    def study_of(values: dict[str, list[float]]) -> optuna.Study:
        return paired_runs_study(values, {"own": keys.OWN_NORMS_GUARD})

    # a larger mean from runs the seeds move together with the own norms' runs: evidence
    assert config_runs(study_of({"own": [0.70, 0.80], "x": [0.72, 0.82]}))[0].label == "x"
    # a larger mean, but the paired differences disagree in sign: no evidence, own kept
    assert config_runs(study_of({"own": [0.70, 0.80], "x": [0.78, 0.74]}))[0].label == "own"
    # a single run a hair above, against a seed spread of 0.07: own kept
    assert config_runs(study_of({"own": [0.70, 0.80], "x": [0.71]}))[0].label == "own"
    # without own norms, a confirmation that lowers the leader's mean does not hand the win to
    # a single run just above it; a single run far above still wins
    assert config_runs(study_of({"a": [0.80, 0.76], "b": [0.79]}))[0].label == "a"
    assert config_runs(study_of({"a": [0.80, 0.76], "b": [0.95]}))[0].label == "b"


def test_a_minimizing_search_promotes_and_keeps_the_lowest():
    plan = staged_plan(trainings=6)
    plan.maximize = False
    study = run(plan, direction="minimize")
    promoted = [t.params for t in of_stage(study, PROMOTE)][:2]
    assert promoted == [dict.fromkeys(PARAMS, "in"), dict.fromkeys(PARAMS, "gn")]
    assert config_runs(study)[0].trials[0].params == {"a": "in", "b": "in", "c": "gn"}


def test_a_rung_that_does_not_predict_the_full_runs_gives_a_slow_starter_a_second_look():
    """The rung ranks in > bn > gn; the full runs rank bn > in, so the rung is not trusted and
    the slowest starter, gn, gets a second look: it ends best."""
    for name in QUALITY:  # in: 0.6 fast; bn: 0.9 rising steadily; gn: 1.2 rising late
        QUALITY[name].update(bn=0.3, gn=0.4, **{"in": 0.2})
    POWER.update({("bn",) * 3: 1.0, ("gn",) * 3: 3.0})
    plan = staged_plan(trainings=6)
    study = run(plan)
    evidence = Evidence(study.trials, plan.rung, True)
    assert [c.label for c in evidence.ranked_screen(SCREEN, 0)] == [
        "uniform:in",
        "uniform:bn",
        "uniform:gn",
    ]
    looks = [t for t in of_stage(study, PROMOTE) if "second look" in t.user_attrs[keys.BASELINE]]
    assert len(looks) == 1 and looks[0].params == dict.fromkeys(PARAMS, "gn")
    assert study.trials[looks[0].user_attrs[keys.CONTINUES]].params == looks[0].params
    assert config_runs(study)[0].trials[0].params == dict.fromkeys(PARAMS, "gn")


def test_a_budget_of_the_grid_screens_every_baseline_promotes_and_confirms():
    plan = staged_plan(trainings=3)  # 27 epochs: 3 screens (9), 2 continued (12); 6 left
    study = run(plan)
    assert stages(study)[:5] == [SCREEN, SCREEN, SCREEN, PROMOTE, PROMOTE]
    assert plan.spent(study.trials) <= 27 and plan.next(study) == DONE


def test_n_trials_alone_bounds_the_plan_and_the_sampler_takes_over():
    plan = staged_plan(trainings=None, n_trials=40)
    study = run(plan)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 40
    assert any(keys.STAGE not in t.user_attrs for t in finished)  # the sampler's, after the plan


def test_the_screen_leaves_room_for_the_promotions_and_random_configs_come_last():
    # two continued promotions (2 x 6 epochs) and two screens of 3 epochs
    plan = staged_plan(trainings=18 / MAX_EPOCHS)
    assert [s.candidate.label for s in plan.screen()] == ["uniform:bn", "uniform:gn"]
    explore = [Candidate("random:1", {"a": "bn", "b": "in", "c": "gn"})]
    plan = staged_plan(trainings=6)
    plan.baselines += explore
    plan.explore = 1
    labels = [s.candidate.label for s in plan.screen()]
    assert labels == ["uniform:bn", "uniform:gn", "uniform:in", "random:1"]
    # three screens, two promotions and two confirmations: no room for the random config
    plan.budget_epochs = 3 * 3 + 2 * 6 + 2 * 9
    assert [s.candidate.label for s in plan.screen()] == labels[:3]
    plan.budget_epochs = 3 + 2 * 6  # too little for two screens: the baselines train in full
    assert {s.stage for s in plan.screen()} == {PROMOTE}


def test_a_queued_trial_that_no_longer_fits_is_skipped_not_left_waiting():
    plan = staged_plan(trainings=2)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(dict.fromkeys(PARAMS, "bn"), user_attrs={keys.STAGE: CONFIRM})
    study.enqueue_trial(dict.fromkeys(PARAMS, "gn"), user_attrs={keys.STAGE: CONFIRM})
    study.enqueue_trial(dict.fromkeys(PARAMS, "in"), user_attrs={keys.STAGE: CONFIRM})
    study.optimize(objective, n_trials=1)  # 9 of 18 epochs left: one more fits
    study.optimize(objective, n_trials=1)
    assert plan.next(study) == DONE
    skipped = study.trials[2]
    assert skipped.state == optuna.trial.TrialState.FAIL
    assert skipped.user_attrs[keys.FAIL_REASON].startswith("skipped: the compute budget ended")


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
    assert certainty["noise"] == pytest.approx(0.2)
    # paired by run: differences -0.1 and +0.3, mean 0.1, standard error 0.2, t = 0.5 with
    # 1 degree of freedom (Cauchy): 0.5 + atan(0.5) / pi
    assert certainty["p_better"] == pytest.approx(0.5 + math.atan(0.5) / math.pi)


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


def test_the_supernet_s_perturbed_config_is_screened_before_the_promotions():
    """The screened SwitchableNorm trial records what perturbing its model chose per slot: the
    plan screens that config next (its rung kept out of the first screen's room), ahead of the
    promotions, and it can win at the grid's compute without a refinement round."""
    favourites = {"a": "in", "b": "in", "c": "gn"}  # the best mix, which no baseline holds

    def objective_with_perturbation(trial: optuna.Trial) -> float:
        if trial.user_attrs.get(keys.BASELINE) == "uniform:gn":  # stands for uniform SN
            trial.set_user_attr(keys.PERTURBED_CHOICES, favourites)
        return objective(trial)

    plan = staged_plan(trainings=4)
    plan.mixed_params = dict
    plan.extra_screens = 1
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    for step in plan.screen():
        study.enqueue_trial(step.candidate.params, user_attrs=step.user_attrs())
    while plan.next(study) == RUN:
        study.optimize(objective_with_perturbation, n_trials=1)
    labels = [t.user_attrs[keys.BASELINE] for t in study.trials]
    assert labels.index("switchable perturbation") < min(
        i for i, t in enumerate(study.trials) if t.user_attrs[keys.STAGE] == PROMOTE
    )
    assert study.trials[labels.index("switchable perturbation")].params == favourites
    assert not of_stage(study, REFINE)
    assert config_runs(study)[0].trials[0].params == favourites
    assert plan.spent(study.trials) <= 4 * MAX_EPOCHS


def test_a_retried_trial_keeps_its_stage_rung_seed_and_the_run_it_continues():
    from autonorm.search._workers import enqueue_retry

    study = optuna.create_study(direction="maximize")
    planned = Planned(PROMOTE, uniform("gn", incumbent=True), continues=Continued(3, 3), run=1)
    study.enqueue_trial(planned.candidate.params, user_attrs=planned.user_attrs())
    study.optimize(lambda t: 1 / 0, n_trials=1, catch=(ZeroDivisionError,))
    assert enqueue_retry(study, study.trials[0])
    retry = study.trials[1]
    kept = {k: v for k, v in retry.user_attrs.items() if k != keys.RETRY_OF}
    assert kept == planned.user_attrs() and retry.user_attrs[keys.RETRY_OF] == 0


def test_a_later_queued_trial_that_fits_runs_after_the_one_that_does_not_is_skipped():
    plan = staged_plan(trainings=1.5)  # 13.5 epochs
    study = optuna.create_study(direction="maximize")
    for step in (
        Planned(CONFIRM, uniform("bn")),
        Planned(CONFIRM, uniform("gn")),
        Planned(SCREEN, uniform("in"), rung=3),
    ):
        study.enqueue_trial(step.candidate.params, user_attrs=step.user_attrs())
    study.optimize(objective, n_trials=1)  # 9 epochs: 4.5 left, a full run no longer fits
    assert plan.next(study) == RUN  # ... but the queued screen of 3 epochs does
    assert study.trials[1].state == optuna.trial.TrialState.FAIL
    study.optimize(objective, n_trials=1)
    assert study.trials[2].params == dict.fromkeys(PARAMS, "in")
    assert study.trials[2].state == optuna.trial.TrialState.PRUNED
    assert plan.next(study) == DONE
