"""Tests of ``autonorm.report._winners``: the best feasible trial and the Pareto front."""

from __future__ import annotations

import optuna
import pytest

from autonorm.report import best_feasible_trial, pareto_trials, write_report, write_summary
from tests.report.studies import (
    CHOICES,
    PLOTLY_MARKER,
    SLOTS,
    make_study,
    multi_objective_study,
    params,
)


def test_best_feasible_trial_skips_infeasible_trials(mixed_study):
    best = best_feasible_trial(mixed_study)
    assert best is not None
    assert best.number == 2 and best.value == 1.0
    # Optuna itself would pick the over-budget trial
    assert mixed_study.best_trial.number == 1


def test_best_feasible_trial_honors_maximize(tmp_path):
    plans = [
        (params("layernorm", "layernorm", "layernorm"), {"plan": "over_budget_at_end"}),  # 6
        (params("layernorm", "layernorm", "batchnorm"), {}),  # 4
        (params("batchnorm", "batchnorm", "batchnorm"), {}),  # 0
    ]
    study = make_study(tmp_path, plans, direction="maximize")
    best = best_feasible_trial(study)
    assert best is not None and best.number == 1 and best.value == 4.0


def test_best_feasible_trial_is_none_without_a_feasible_trial(tmp_path):
    empty = optuna.create_study(storage=f"sqlite:///{tmp_path / 'empty.db'}")
    assert best_feasible_trial(empty) is None
    plans = [
        (params("batchnorm", "batchnorm", "batchnorm"), {"plan": "over_budget_at_start"}),
        (params("layernorm", "batchnorm", "batchnorm"), {"plan": "over_budget_at_end"}),
    ]
    assert best_feasible_trial(make_study(tmp_path, plans)) is None


def test_best_feasible_trial_refuses_a_multi_objective_study():
    study = optuna.create_study(directions=["minimize", "minimize"])
    with pytest.raises(ValueError, match="pareto_trials"):
        best_feasible_trial(study)


def test_pareto_trials_keeps_feasible_non_dominated_trials(tmp_path):
    points = [
        (1.0, 5.0, True),  # front
        (2.0, 2.0, True),  # front
        (5.0, 1.0, True),  # front
        (3.0, 3.0, True),  # dominated by (2, 2)
        (0.5, 0.5, False),  # dominates everything, but over the budget
    ]
    study = multi_objective_study(tmp_path, points)
    assert [t.number for t in pareto_trials(study)] == [0, 1, 2]

    summary = write_summary(study, tmp_path / "out")
    assert summary["best_value"] is None and summary["best_config"] is None
    assert [p["trial"] for p in summary["pareto"]] == [0, 1, 2]
    assert summary["pareto"][1]["values"] == [2.0, 2.0]
    assert summary["pareto"][0]["config"] == {SLOTS[0]: CHOICES[0]}
    assert summary["objectives"] == ["val_loss", "params"]

    html = write_report(study, tmp_path / "out" / "report.html").read_text()
    assert "Pareto front" in html and html.count(PLOTLY_MARKER) == 1


def test_pareto_trials_matches_optuna_without_infeasible_trials(tmp_path):
    points = [(1.0, 5.0, True), (2.0, 2.0, True), (3.0, 3.0, True), (2.0, 2.0, True)]
    study = multi_objective_study(tmp_path, points)
    assert [t.number for t in pareto_trials(study)] == sorted(t.number for t in study.best_trials)


def test_a_reused_result_is_not_a_second_point_of_the_pareto_front(tmp_path):
    from autonorm._trial_keys import REUSED_FROM

    study = multi_objective_study(tmp_path, [(1.0, 5.0, True), (2.0, 2.0, True)])
    original = study.trials[1]
    study.add_trial(  # what the search records when a proposal equals a finished trial
        optuna.trial.create_trial(
            params=original.params,
            distributions=original.distributions,
            values=original.values,
            user_attrs={**original.user_attrs, REUSED_FROM: original.number},
        )
    )
    assert [t.number for t in pareto_trials(study)] == [0, 1]
    summary = write_summary(study, tmp_path / "out")
    assert [p["trial"] for p in summary["pareto"]] == [0, 1]
