"""The rules ``autonorm.report._winners`` picks winners by, on real Optuna trials: which trials
count, how configs rank, when paired evidence replaces the chosen or a guarded config, how sure
the choice is (Student's t), the plain-layer fallback, and the Pareto front's directions."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from autonorm import _trial_keys as keys
from autonorm.report import (
    ConfigRuns,
    best_feasible_trial,
    choice_certainty,
    config_runs,
    deployable_runs,
    is_feasible,
    params_key,
    pareto_trials,
    rank_runs,
)
from autonorm.report._winners import (
    EVIDENCE,
    better,
    feasible_complete,
    has_finite_values,
    maximizes,
    paired_evidence,
    student_t_cdf,
)

GUARDS = {"own": keys.OWN_NORMS_GUARD, "default": keys.DEFAULT_GUARD}


def runs_study(
    runs: dict[str, list[float | None]],
    *,
    direction: str = "maximize",
    guards: dict[str, int] | None = None,
) -> optuna.Study:
    """An in-memory study of full runs, config by config: config ``name``'s k-th entry is its run
    of run index k (None: that run was not trained); ``guards`` marks the configs kept unless
    the evidence says otherwise."""
    study = optuna.create_study(direction=direction)
    distribution = CategoricalDistribution(list(runs))
    for name, values in runs.items():
        for index, value in enumerate(values):
            if value is None:
                continue
            attrs = {keys.RUN_INDEX: index, keys.BASELINE: name}
            if guards and name in guards:
                attrs[keys.INCUMBENT] = guards[name]
            study.add_trial(
                create_trial(
                    params={"p": name},
                    distributions={"p": distribution},
                    value=value,
                    user_attrs=attrs,
                )
            )
    return study


def ranking(study: optuna.Study) -> list[str | None]:
    """The configs' labels, the chosen one first."""
    return [r.label for r in config_runs(study)]


def config(*values: float | None) -> ConfigRuns:
    """One config's runs: the k-th value is its run of run index k (None: not trained)."""
    return ConfigRuns(
        tuple(
            create_trial(value=v, user_attrs={keys.RUN_INDEX: k})
            for k, v in enumerate(values)
            if v is not None
        )
    )


def cauchy_cdf(t: float) -> float:
    """Student's t with one degree of freedom, in closed form."""
    return 0.5 + math.atan(t) / math.pi


# -- which trials count --------------------------------------------------------------------------


def test_only_complete_trials_within_the_budget_with_finite_values_count():
    study = optuna.create_study(direction="minimize")
    distribution = CategoricalDistribution(range(6))
    for number, (state, value, attrs) in enumerate(
        [
            (TrialState.COMPLETE, 0.5, {}),
            (TrialState.COMPLETE, 0.1, {keys.FEASIBLE: False}),
            (TrialState.COMPLETE, 0.2, {keys.FEASIBLE: True}),
            (TrialState.COMPLETE, -math.inf, {}),
            (TrialState.PRUNED, 0.05, {}),  # its last intermediate value
            (TrialState.FAIL, None, {}),
        ]
    ):
        study.add_trial(
            create_trial(
                state=state,
                value=value,
                params={"p": number},
                distributions={"p": distribution},
                user_attrs=attrs,
            )
        )
    trials = study.trials
    assert [t.number for t in feasible_complete(trials)] == [0, 2]
    assert [is_feasible(t) for t in trials] == [True, False, True, True, True, True]
    assert [has_finite_values(t) for t in trials] == [True, True, True, False, True, False]
    best = best_feasible_trial(study)
    assert best is not None and best.number == 2


def test_better_needs_a_strict_improvement_in_the_study_s_direction():
    assert better(0.1, None, maximize=True) and better(0.1, None, maximize=False)
    assert better(0.7, 0.5, maximize=True) and not better(0.7, 0.5, maximize=False)
    assert better(0.3, 0.5, maximize=False) and not better(0.3, 0.5, maximize=True)
    assert not better(0.5, 0.5, maximize=True) and not better(0.5, 0.5, maximize=False)


def test_params_key_ignores_the_order_and_compares_values_as_text():
    assert params_key({"b": 4, "a": "gn"}) == (("a", "gn"), ("b", "4"))
    assert params_key({"b": 4, "a": "gn"}) == params_key({"a": "gn", "b": "4"})
    assert params_key({"a": "gn"}) != params_key({"a": "bn"})


def test_maximizes_reads_each_objective_s_direction():
    study = optuna.create_study(directions=["minimize", "maximize"])
    assert not maximizes(study) and maximizes(study, 1)
    assert maximizes(optuna.create_study(direction="maximize"))


# -- how configs rank ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "expected"),
    [("maximize", ["b", "d", "a", "c"]), ("minimize", ["c", "a", "b", "d"])],
)
def test_single_runs_rank_best_first_in_the_study_s_direction_and_ties_go_to_the_earliest(
    direction, expected
):
    study = runs_study({"a": [0.5], "b": [0.75], "c": [0.25], "d": [0.75]}, direction=direction)
    assert ranking(study) == expected
    best = best_feasible_trial(study)
    assert best is not None and best.params == {"p": expected[0]}


def test_rank_runs_keeps_each_config_s_runs_earliest_first_whatever_the_order_given():
    study = runs_study({"a": [0.5, 0.25, 0.75], "b": [0.25, 0.5]})
    trials = study.get_trials()
    ranked = rank_runs(reversed(trials), maximize=True)
    assert [r.label for r in ranked] == ["a", "b"]
    assert [[t.number for t in r.trials] for r in ranked] == [[0, 1, 2], [3, 4]]


def test_a_reused_result_is_not_another_run_of_its_config():
    study = runs_study({"a": [0.5], "b": [0.25]})
    original = study.trials[0]
    study.add_trial(
        create_trial(
            params=original.params,
            distributions=original.distributions,
            value=original.value,
            user_attrs={**original.user_attrs, keys.REUSED_FROM: original.number},
        )
    )
    assert [[t.number for t in r.trials] for r in config_runs(study)] == [[0], [1]]


def test_a_run_index_trained_twice_counts_once_at_its_mean():
    assert config(0.25, 0.5).by_run() == {0: 0.25, 1: 0.5}
    twice = ConfigRuns(
        tuple(
            create_trial(value=v, user_attrs={keys.RUN_INDEX: k})
            for k, v in [(0, 0.25), (1, 0.5), (0, 0.75)]
        )
    )
    assert twice.by_run() == {0: 0.5, 1: 0.5}


# -- paired evidence -----------------------------------------------------------------------------


def test_the_choice_starts_from_the_best_mean_among_the_configs_run_most_often():
    # b's single run a hair above a's mean, but below a's run of the same seed: a is kept
    assert ranking(runs_study({"a": [0.80, 0.76], "b": [0.79]})) == ["a", "b"]
    # a hair above a's run of the same seed, well within a's seed spread: no evidence either
    assert ranking(runs_study({"a": [0.80, 0.76], "b": [0.81]})) == ["a", "b"]
    # a single run far above, against a's seed spread: evidence, b wins
    assert ranking(runs_study({"a": [0.80, 0.76], "b": [0.95]})) == ["b", "a"]


def test_a_lower_mean_wins_when_every_paired_run_is_better():
    # a's mean owes to its lucky first run; c, never run with that seed, beats a on both others
    assert ranking(runs_study({"a": [1.5, 0.5, 0.5], "c": [None, 0.75, 0.75]})) == ["c", "a"]


def test_evidence_of_exactly_the_threshold_is_enough_to_replace_a_config():
    d = math.tan(0.2 * math.pi)  # paired differences 1 + d and 1 - d: t = 1 / d, P = 0.8
    assert paired_evidence(config(1 + d, 1 - d), config(0.0, 0.0), True) == EVIDENCE
    # the config run most often (a, three runs) is replaced by a challenger
    assert ranking(runs_study({"a": [0.0, 0.0, 0.0], "b": [1 + d, 1 - d]})) == ["b", "a"]
    # the chosen config is not handed back to the own norms
    study = runs_study({"own": [0.0, 0.0], "b": [1 + d, 1 - d]}, guards=GUARDS)
    assert ranking(study) == ["b", "own"]


def test_the_model_s_own_norms_are_replaced_only_on_paired_evidence():
    # a larger mean, but the paired differences disagree in sign: the own norms are kept
    assert ranking(runs_study({"own": [0.70, 0.80], "x": [0.78, 0.74]}, guards=GUARDS)) == [
        "own",
        "x",
    ]
    # better on both paired runs: evidence
    assert ranking(runs_study({"own": [0.70, 0.80], "x": [0.72, 0.82]}, guards=GUARDS)) == [
        "x",
        "own",
    ]
    study = runs_study({"x": [0.75, 0.75], "own": [0.70, 0.80], "y": [0.5, 0.25]}, guards=GUARDS)
    assert ranking(study) == ["own", "x", "y"]
    # x's run of the own norms' seed a hair better, well within x's seed spread: own kept
    assert ranking(runs_study({"own": [0.70], "x": [0.72, 0.76]}, guards=GUARDS)) == ["own", "x"]
    # minimized: lower on both paired runs is evidence
    study = runs_study(
        {"own": [0.30, 0.20], "x": [0.28, 0.18]}, direction="minimize", guards=GUARDS
    )
    assert ranking(study) == ["x", "own"]


def test_a_default_the_user_named_has_the_last_word_over_the_own_norms():
    # tied on their paired runs: the default is kept
    study = runs_study({"own": [0.70, 0.80], "default": [0.72, 0.78]}, guards=GUARDS)
    assert ranking(study) == ["default", "own"]
    # the own norms better on both paired runs: evidence replaces the default
    study = runs_study({"own": [0.72, 0.83], "default": [0.70, 0.80]}, guards=GUARDS)
    assert ranking(study) == ["own", "default"]


@pytest.mark.parametrize("maximize", [True, False])
def test_paired_evidence_without_noise_is_certain_by_the_sign_of_the_difference(maximize):
    up, down, tie = (1.0, 0.0, 0.5) if maximize else (0.0, 1.0, 0.5)
    # two pairs whose differences agree exactly: no noise
    assert paired_evidence(config(0.75, 1.0), config(0.5, 0.75), maximize) == up
    assert paired_evidence(config(0.5, 0.75), config(0.75, 1.0), maximize) == down
    assert paired_evidence(config(0.5, 0.75), config(0.5, 0.75), maximize) == tie
    # one pair and no seed spread known: the better single value wins, a tie keeps the chosen
    assert paired_evidence(config(0.75), config(0.5), maximize) == up
    assert paired_evidence(config(0.5), config(0.75), maximize) == down
    assert paired_evidence(config(0.5), config(0.5), maximize) == 0.0
    # one pair, and a seed spread of zero
    assert paired_evidence(config(0.5), config(0.5), maximize, (0.0, 3)) == tie


@pytest.mark.parametrize("maximize", [True, False])
def test_paired_evidence_is_student_t_on_the_paired_differences(maximize):
    sign = 1.0 if maximize else -1.0
    # differences 0.5 and 0.25: mean 0.375, standard error 0.125, t = 3 with 1 degree of freedom;
    # a seed spread does not count where two pairs or more are
    for spread in (None, (1.0, 5)):
        p = paired_evidence(config(0.75, 0.5), config(0.25, 0.25), maximize, spread)
        assert p == pytest.approx(cauchy_cdf(sign * 3.0))


@pytest.mark.parametrize("maximize", [True, False])
def test_a_single_pair_is_weighed_against_the_pooled_seed_spread(maximize):
    sign = 1.0 if maximize else -1.0
    spread = (math.sqrt(2) / 8, 1)  # a difference of two runs: noise 0.25
    p = paired_evidence(config(0.75), config(0.25), maximize, spread)
    assert p == pytest.approx(cauchy_cdf(sign * 2.0))  # difference 0.5: t = 2
    # no run index in common: the means, against the same spread
    p = paired_evidence(config(None, 0.75, 0.75), config(0.25), maximize, spread)
    assert p == pytest.approx(cauchy_cdf(sign * 2.0))


# -- how sure the choice is ----------------------------------------------------------------------


def test_there_is_no_certainty_without_a_runner_up():
    assert choice_certainty([], True) is None
    assert choice_certainty(config_runs(runs_study({"a": [0.5, 0.75]})), True) is None


@pytest.mark.parametrize(
    ("direction", "values"), [("maximize", [0.75, 0.5]), ("minimize", [0.25, 0.5])]
)
def test_single_runs_give_the_gap_but_no_noise(direction, values):
    study = runs_study({"a": [values[0]], "b": [values[1]]}, direction=direction)
    certainty = choice_certainty(config_runs(study), direction == "maximize")
    assert certainty == {"runner_up": "b", "gap": 0.25, "noise": None, "p_better": None}


def test_the_certainty_pools_the_seed_spread_of_every_config_run_more_than_once():
    runs = config_runs(runs_study({"a": [1.0, 0.5, 0.75], "b": [0.25, 0.75]}))
    assert [r.label for r in runs] == ["a", "b"]
    certainty = choice_certainty(runs, True)
    assert certainty is not None
    assert certainty["runner_up"] == "b" and certainty["gap"] == pytest.approx(0.25)
    # squares 0.125 + 0.125 over 2 + 1 degrees of freedom; standard error over 3 and 2 runs
    assert certainty["noise"] == pytest.approx(math.sqrt(0.25 / 3) * math.sqrt(1 / 3 + 1 / 2))
    # paired differences 0.75 and -0.25: mean 0.25, standard error 0.5, t = 0.5
    assert certainty["p_better"] == pytest.approx(cauchy_cdf(0.5))


def test_the_certainty_of_a_minimized_choice_with_one_shared_seed_uses_the_pooled_spread():
    runs = config_runs(runs_study({"a": [0.25, 0.75], "b": [1.0]}, direction="minimize"))
    assert [r.label for r in runs] == ["a", "b"]
    certainty = choice_certainty(runs, False)
    assert certainty is not None
    assert certainty["runner_up"] == "b" and certainty["gap"] == pytest.approx(0.5)
    pooled = math.sqrt(0.125)  # a's two runs, one degree of freedom
    assert certainty["noise"] == pytest.approx(pooled * math.sqrt(1 / 2 + 1))
    # one shared seed: difference 0.75 against the noise of a difference of two runs
    assert certainty["p_better"] == pytest.approx(cauchy_cdf(0.75 / (pooled * math.sqrt(2))))


#: ``(degrees of freedom, t, P(T <= t))``, from ``scipy.stats.t.cdf``
T_CDF = [
    (1, -2.5, 0.12111894159084341),
    (2, 1.5, 0.8638034375544994),
    (3, -0.7, 0.2671634991523818),
    (4, 2.0, 0.9419417382415922),
    (5, 1.2, 0.8580544716469487),
    (6, -1.8, 0.060976210691943984),
    (7, 0.9, 0.8009882405113549),
    (8, 2.5, 0.981528981143188),
    (9, -3.1, 0.006361227989100975),
    (12, 1.1, 0.8535451307547524),
]


@pytest.mark.parametrize(("freedom", "t", "expected"), T_CDF)
def test_student_t_cdf_matches_reference_values(freedom, t, expected):
    assert student_t_cdf(t, freedom) == pytest.approx(expected, abs=1e-12)
    assert student_t_cdf(-t, freedom) == pytest.approx(1 - expected, abs=1e-12)


def test_student_t_cdf_refuses_no_degrees_of_freedom():
    assert student_t_cdf(0.0, 1) == 0.5
    with pytest.raises(ValueError, match="`freedom` must be a positive int, got 0"):
        student_t_cdf(1.0, 0)


# -- the plain-layer fallback --------------------------------------------------------------------


def plain_fallback(configs: list[tuple[str, str]]) -> dict[str, str] | None:
    """The params of :func:`deployable_runs` on single runs of ``configs`` (best first)."""
    study = optuna.create_study(direction="maximize")
    choices = CategoricalDistribution(["batchnorm", "layernorm", "switchable"])
    for rank, (a, b) in enumerate(configs):
        study.add_trial(
            create_trial(
                params={"a": a, "b": b},
                distributions={"a": choices, "b": choices},
                value=1.0 - rank / 10,
            )
        )
    plain = deployable_runs(config_runs(study), lambda t: t.params)
    return None if plain is None else plain.trials[0].params


def test_a_choice_that_mixes_at_inference_falls_back_to_the_best_config_of_plain_layers():
    best = ("switchable", "batchnorm")
    assert plain_fallback([best, ("batchnorm", "layernorm"), ("layernorm", "layernorm")]) == {
        "a": "batchnorm",
        "b": "layernorm",
    }
    # another config that mixes is no fallback
    configs = [best, ("batchnorm", "switchable"), ("layernorm", "layernorm"), ("batchnorm",) * 2]
    assert plain_fallback(configs) == {"a": "layernorm", "b": "layernorm"}


def test_a_plain_choice_or_no_plain_config_gives_no_fallback():
    assert plain_fallback([("batchnorm", "layernorm"), ("layernorm", "layernorm")]) is None
    assert plain_fallback([("switchable", "batchnorm"), ("layernorm", "switchable")]) is None
    assert plain_fallback([]) is None


# -- the winners handed out ----------------------------------------------------------------------


def test_the_winners_are_copies_the_caller_may_change():
    single = runs_study({"a": [0.5]})
    best = best_feasible_trial(single)
    assert isinstance(best, FrozenTrial)
    best.user_attrs["note"] = "changed"
    assert "note" not in single.trials[0].user_attrs

    multi = optuna.create_study(directions=["minimize", "minimize"])
    multi.add_trial(create_trial(values=[1.0, 2.0]))
    front = pareto_trials(multi)
    front[0].user_attrs["note"] = "changed"
    assert "note" not in multi.trials[0].user_attrs


def test_the_pareto_front_follows_each_objective_s_direction():
    study = optuna.create_study(directions=["maximize", "minimize"])
    points = [
        (0.9, 5.0),  # front
        (0.5, 2.0),  # front: the smallest
        (0.4, 3.0),  # less accurate and larger than (0.5, 2.0): dominated
        (0.9, 6.0),  # as accurate as (0.9, 5.0), larger: dominated
        (0.5, 2.0),  # equal to a point of the front: on it too
        (0.95, 7.0),  # front: the most accurate, the largest
    ]
    distribution = FloatDistribution(0.0, 1.0)
    for accuracy, size in points:
        study.add_trial(
            create_trial(
                params={"x": accuracy}, distributions={"x": distribution}, values=[accuracy, size]
            )
        )
    front = [t.number for t in pareto_trials(study)]
    assert front == [0, 1, 4, 5]
    assert front == sorted(t.number for t in study.best_trials)
