"""Tests of ``autonorm.report._summary``: trial categories and summary.json."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from optuna.trial import TrialState

from autonorm._trial_keys import FEASIBLE
from autonorm.report import trial_category, write_summary
from tests.report.studies import SLOTS


def _reject_nan(token: str) -> None:
    raise AssertionError(f"summary.json holds {token}")


def test_write_summary_counts_trials_by_state(mixed_study, tmp_path):
    out = tmp_path / "bundle"
    summary = write_summary(mixed_study, out, elapsed=12.5)
    on_disk = json.loads((out / "summary.json").read_text(), parse_constant=_reject_nan)
    assert on_disk == summary
    assert [p.name for p in out.iterdir()] == ["summary.json"]  # no temporary file left

    assert summary["trials"] == {
        "total": 7,
        "complete": 3,
        "pruned": 1,
        "infeasible": 2,
        "failed": 1,
        "running": 0,
        "waiting": 0,
    }
    assert summary["study_name"] == "autonorm-Toy"
    assert summary["directions"] == ["minimize"]
    assert summary["monitor"] == "val_loss" and summary["mode"] == "min"
    assert summary["best_value"] == 1.0 and summary["best_trial"] == 2
    assert summary["best_config"] == {
        "stem.bn": "batchnorm",
        "layer1.0.bn1": "batchnorm",
        "head.norm": {"name": "groupnorm", "groups": 4},
    }
    assert summary["pareto"] is None
    assert summary["baselines"] == [
        {"label": "own norms", "trial": 0, "state": "complete", "value": 3.0, "values": [3.0]}
    ]
    # 4 trials trained 3 epochs, the pruned one 1, the one rejected at the start 0
    assert summary["epochs"] == {"run": 13, "saved_by_pruning": 2 + 3 + 0, "max_epochs": 3}
    assert summary["infeasible_reasons"] == {
        "12000 parameters > budget max_params=1000": 1,
        "peak memory 9 GiB > budget max_memory=1 GiB": 1,
    }
    assert summary["budget"]["max_params"] == 1000
    assert summary["elapsed"] == 12.5
    assert [s["name"] for s in summary["slots"]] == SLOTS


def test_write_summary_writes_null_for_non_finite_values(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'inf.db'}")
    study.add_trial(optuna.trial.create_trial(value=math.inf))
    summary = write_summary(study, tmp_path, elapsed=math.nan)
    assert summary["best_value"] is None and summary["elapsed"] is None
    json.loads((tmp_path / "summary.json").read_text(), parse_constant=_reject_nan)


@pytest.mark.parametrize(
    ("state", "feasible", "category"),
    [
        (TrialState.COMPLETE, None, "complete"),
        (TrialState.PRUNED, None, "pruned"),
        (TrialState.FAIL, None, "failed"),
        (TrialState.RUNNING, None, "running"),
        (TrialState.WAITING, None, "waiting"),
        (TrialState.COMPLETE, True, "complete"),
        # over the budget: infeasible whatever the Optuna state of a finished trial
        (TrialState.COMPLETE, False, "infeasible"),
        (TrialState.PRUNED, False, "infeasible"),
        (TrialState.FAIL, False, "infeasible"),
        # not finished yet: its state wins
        (TrialState.RUNNING, False, "running"),
        (TrialState.WAITING, False, "waiting"),
    ],
)
def test_trial_category(state, feasible, category):
    attrs = {} if feasible is None else {FEASIBLE: feasible}
    value = 1.0 if state == TrialState.COMPLETE else None
    trial = optuna.trial.create_trial(state=state, value=value, user_attrs=attrs)
    assert trial_category(trial) == category
