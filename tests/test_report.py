"""Tests of ``autonorm.report`` on real Optuna studies stored in SQLite (no mocks)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import optuna
import pytest

from autonorm.report import (
    attach_dashboard_artifacts,
    best_feasible_trial,
    pareto_trials,
    write_report,
    write_summary,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SLOTS = ["stem.bn", "layer1.0.bn1", "head.norm"]
CHOICES = ["batchnorm", "groupnorm(g=4)", "layernorm"]
MAX_EPOCHS = 3
PLOTLY_MARKER = "* plotly.js v"  # the banner at the top of the inlined plotly.js bundle


def _stored_choice(label: str) -> str | dict:
    """Choices as the search stores them: a label, or a dict for a parametrized norm."""
    return {"name": "groupnorm", "groups": 4} if label == "groupnorm(g=4)" else label


def _objective(trial: optuna.Trial) -> float:
    """A toy search trial: the value is the sum of the choice indices (plus a per-epoch offset),
    and the enqueued ``plan`` attribute says how the trial ends, as autonorm's search would."""
    config = {slot: trial.suggest_categorical(slot, CHOICES) for slot in SLOTS}
    trial.set_user_attr("config", {k: _stored_choice(v) for k, v in config.items()})
    plan = trial.user_attrs.get("plan", "complete")
    value = float(sum(CHOICES.index(c) for c in config.values()))
    if plan == "fail":
        raise RuntimeError("boom")
    if plan == "over_budget_at_start":
        trial.set_user_attr("feasible", False)
        trial.set_user_attr("infeasible_reason", "peak memory 9 GiB > budget max_memory=1 GiB")
        raise optuna.TrialPruned("Trial is infeasible: peak memory.")
    for epoch in range(MAX_EPOCHS):
        trial.report(value + 0.1 * (MAX_EPOCHS - 1 - epoch), step=epoch)
        trial.set_user_attr("epochs", epoch + 1)
        if plan == "pruned" and epoch == 0:
            trial.set_user_attr("prune_reason", "pruned by MedianPruner at epoch 0")
            raise optuna.TrialPruned("Trial was pruned at epoch 0.")
    if plan == "over_budget_at_end":  # over the budget, but it still returns a value
        trial.set_user_attr("feasible", False)
        trial.set_user_attr("infeasible_reason", "12000 parameters > budget max_params=1000")
    return value


def _params(*labels: str) -> dict[str, str]:
    return dict(zip(SLOTS, labels, strict=True))


def _make_study(
    tmp_path: Path,
    plans: list[tuple[dict[str, str], dict]],
    *,
    direction: Literal["minimize", "maximize"] = "minimize",
    name: str = "autonorm-Toy",
) -> optuna.Study:
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        study_name=name,
        direction=direction,
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.NopPruner(),
    )
    study.set_user_attr(
        "autonorm",
        {
            "monitor": "val_loss",
            "mode": "min" if direction == "minimize" else "max",
            "objectives": ["val_loss"],
            "budget": {"max_memory": 1 << 30, "batch_size": None, "max_params": 1000},
            "space": {"name": "toy"},
            "model_class": "tests.Toy",
            "slots": [
                {"name": s, "kind": "BatchNorm2d", "num_features": 8, "layout": "channels_first"}
                for s in SLOTS
            ],
            "max_epochs": MAX_EPOCHS,
        },
    )
    for params, attrs in plans:
        study.enqueue_trial(params, user_attrs=attrs)
    study.optimize(_objective, n_trials=len(plans), catch=(RuntimeError,))
    return study


MIXED = [
    (_params("groupnorm(g=4)", "groupnorm(g=4)", "groupnorm(g=4)"), {"baseline": "own norms"}),
    (_params("batchnorm", "batchnorm", "batchnorm"), {"plan": "over_budget_at_end"}),  # value 0
    (_params("batchnorm", "batchnorm", "groupnorm(g=4)"), {}),  # value 1: the best feasible
    (_params("batchnorm", "groupnorm(g=4)", "layernorm"), {"plan": "pruned"}),
    (_params("layernorm", "layernorm", "batchnorm"), {"plan": "over_budget_at_start"}),
    (_params("layernorm", "batchnorm", "batchnorm"), {"plan": "fail"}),
    (_params("layernorm", "layernorm", "layernorm"), {}),  # value 6
]


@pytest.fixture
def mixed_study(tmp_path: Path) -> optuna.Study:
    return _make_study(tmp_path, MIXED)


# -- best trial and Pareto front -------------------------------------------------------------


def test_best_feasible_trial_skips_infeasible_trials(mixed_study):
    best = best_feasible_trial(mixed_study)
    assert best is not None
    assert best.number == 2 and best.value == 1.0
    # Optuna itself would pick the over-budget trial
    assert mixed_study.best_trial.number == 1


def test_best_feasible_trial_honors_maximize(tmp_path):
    plans = [
        (_params("layernorm", "layernorm", "layernorm"), {"plan": "over_budget_at_end"}),  # 6
        (_params("layernorm", "layernorm", "batchnorm"), {}),  # 4
        (_params("batchnorm", "batchnorm", "batchnorm"), {}),  # 0
    ]
    study = _make_study(tmp_path, plans, direction="maximize")
    best = best_feasible_trial(study)
    assert best is not None and best.number == 1 and best.value == 4.0


def test_best_feasible_trial_is_none_without_a_feasible_trial(tmp_path):
    empty = optuna.create_study(storage=f"sqlite:///{tmp_path / 'empty.db'}")
    assert best_feasible_trial(empty) is None
    plans = [
        (_params("batchnorm", "batchnorm", "batchnorm"), {"plan": "over_budget_at_start"}),
        (_params("layernorm", "batchnorm", "batchnorm"), {"plan": "over_budget_at_end"}),
    ]
    assert best_feasible_trial(_make_study(tmp_path, plans)) is None


def test_best_feasible_trial_refuses_a_multi_objective_study():
    study = optuna.create_study(directions=["minimize", "minimize"])
    with pytest.raises(ValueError, match="pareto_trials"):
        best_feasible_trial(study)


def _multi_objective_study(tmp_path: Path, points: list[tuple[float, float, bool]]) -> optuna.Study:
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'multi.db'}",
        study_name="multi",
        directions=["minimize", "minimize"],
    )
    study.set_user_attr("autonorm", {"monitor": "val_loss", "objectives": ["val_loss", "params"]})
    for i, (a, b, feasible) in enumerate(points):
        study.enqueue_trial(
            {SLOTS[0]: CHOICES[i % 3]}, user_attrs={"point": [a, b], "feasible_plan": feasible}
        )

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        choice = trial.suggest_categorical(SLOTS[0], CHOICES)
        trial.set_user_attr("config", {SLOTS[0]: choice})
        if not trial.user_attrs["feasible_plan"]:
            trial.set_user_attr("feasible", False)
        a, b = trial.user_attrs["point"]
        return a, b

    study.optimize(objective, n_trials=len(points))
    return study


def test_pareto_trials_keeps_feasible_non_dominated_trials(tmp_path):
    points = [
        (1.0, 5.0, True),  # front
        (2.0, 2.0, True),  # front
        (5.0, 1.0, True),  # front
        (3.0, 3.0, True),  # dominated by (2, 2)
        (0.5, 0.5, False),  # dominates everything, but over the budget
    ]
    study = _multi_objective_study(tmp_path, points)
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
    study = _multi_objective_study(tmp_path, points)
    assert [t.number for t in pareto_trials(study)] == sorted(t.number for t in study.best_trials)


def test_report_of_a_three_objective_study(tmp_path):
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'three.db'}", directions=["minimize"] * 3
    )
    distribution = optuna.distributions.CategoricalDistribution(CHOICES)
    for i, values in enumerate([(1, 2, 3), (3, 2, 1), (2, 2, 2), (3, 3, 3)]):
        study.add_trial(
            optuna.trial.create_trial(
                params={SLOTS[0]: CHOICES[i % 3]},
                distributions={SLOTS[0]: distribution},
                values=values,
                user_attrs={"config": {SLOTS[0]: CHOICES[i % 3]}},
            )
        )
    assert [t.number for t in pareto_trials(study)] == [0, 1, 2]
    html = write_report(study, tmp_path / "report.html").read_text()
    assert '"type":"splom"' in html and html.count(PLOTLY_MARKER) == 1


# -- summary.json ----------------------------------------------------------------------------


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


# -- report.html -----------------------------------------------------------------------------


def test_report_is_self_contained_and_names_the_slots(mixed_study, tmp_path):
    path = write_report(mixed_study, tmp_path / "sub" / "report.html")
    assert path == tmp_path / "sub" / "report.html"
    html = path.read_text()
    assert "plotly" in html.lower()
    assert html.count(PLOTLY_MARKER) == 1  # plotly.js inlined exactly once
    assert '<script src="http' not in html  # nothing to fetch: opens offline
    assert html.count("Plotly.newPlot(") >= 3  # history, choice map, intermediate values
    for slot in SLOTS:
        assert slot in html
    assert "Optimization history" in html and "Which choice won, per slot" in html
    assert "Choice importance" in html and "Intermediate values" in html
    assert "groupnorm(groups=4)" in html  # dict choices get a readable label
    assert "own norms" in html
    assert "max_memory=1 GiB, max_params=1000; rejected 2 trials" in html
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_report_of_an_empty_study(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'empty.db'}", study_name="empty")
    html = write_report(study, tmp_path / "report.html").read_text()
    assert "no trials yet" in html
    assert "empty" in html


def test_report_when_every_trial_is_infeasible(tmp_path):
    plans = [
        (_params("batchnorm", "batchnorm", "batchnorm"), {"plan": "over_budget_at_start"}),
        (_params("layernorm", "batchnorm", "batchnorm"), {"plan": "over_budget_at_end"}),
        (_params("layernorm", "layernorm", "batchnorm"), {"plan": "over_budget_at_start"}),
    ]
    study = _make_study(tmp_path, plans)
    html = write_report(study, tmp_path / "report.html").read_text()
    assert "All 3 trials were over the budget" in html
    assert "No importance estimate" in html
    assert html.count(PLOTLY_MARKER) == 1
    summary = write_summary(study, tmp_path)
    assert summary["best_value"] is None and summary["trials"]["infeasible"] == 3


def test_report_when_every_trial_is_pruned(tmp_path):
    plans = [(_params("batchnorm", "batchnorm", c), {"plan": "pruned"}) for c in CHOICES]
    html = write_report(_make_study(tmp_path, plans), tmp_path / "report.html").read_text()
    assert "No trial completed within the budget (3 pruned)" in html


def test_report_escapes_user_strings(tmp_path):
    name = "<script>alert('study')</script>"
    plans = [(_params("batchnorm", "batchnorm", "batchnorm"), {"baseline": "<b>own</b> norms"})]
    study = _make_study(tmp_path, plans, name=name)
    html = write_report(study, tmp_path / "report.html").read_text()
    assert name not in html and "<b>own</b>" not in html
    assert "&lt;script&gt;alert(&#x27;study&#x27;)&lt;/script&gt;" in html
    assert "&lt;b&gt;own&lt;/b&gt; norms" in html


# -- optuna-dashboard ------------------------------------------------------------------------


def test_attach_dashboard_artifacts_uploads_files_and_writes_a_note(mixed_study, tmp_path):
    get_note = pytest.importorskip("optuna_dashboard").get_note
    out = tmp_path / "bundle"
    out.mkdir()
    config = out / "best_config.yaml"
    config.write_text("stem.bn: batchnorm\n")
    report = write_report(mixed_study, out / "report.html")
    attach_dashboard_artifacts(mixed_study, out, [config, report])

    metas = optuna.artifacts.get_all_artifact_meta(mixed_study)
    assert sorted(m.filename for m in metas) == ["best_config.yaml", "report.html"]
    stored = {p.name for p in (out / "artifacts").iterdir()}
    assert stored == {m.artifact_id for m in metas}
    by_name = {m.filename: m for m in metas}
    assert by_name["best_config.yaml"].mimetype == "text/plain"
    assert (out / "artifacts" / by_name["best_config.yaml"].artifact_id).read_text() == (
        "stem.bn: batchnorm\n"
    )

    note = get_note(mixed_study)
    assert note.startswith("## autonorm summary")
    assert "Model `tests.Toy`, metric `val_loss` (min)." in note
    assert "**Best value:** 1 (trial 2)" in note
    assert "| `head.norm` | `groupnorm(groups=4)` |" in note
    assert "3 complete" in note and "2 infeasible" in note and "1 pruned" in note
    assert "`best_config.yaml`" in note

    # a rebuild neither duplicates unchanged files nor keeps a stale note
    config.write_text("stem.bn: layernorm\n")
    attach_dashboard_artifacts(mixed_study, out, [config, report])
    metas = optuna.artifacts.get_all_artifact_meta(mixed_study)
    assert sorted(m.filename for m in metas) == ["best_config.yaml"] * 2 + ["report.html"]
    assert get_note(mixed_study).startswith("## autonorm summary")


def test_attach_dashboard_artifacts_keeps_a_handwritten_note(mixed_study, tmp_path):
    dashboard = pytest.importorskip("optuna_dashboard")
    dashboard.save_note(mixed_study, "my own observations")
    attach_dashboard_artifacts(mixed_study, tmp_path, [])
    assert dashboard.get_note(mixed_study) == "my own observations"


def test_attach_dashboard_artifacts_without_files_creates_the_store(tmp_path):
    dashboard = pytest.importorskip("optuna_dashboard")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'empty.db'}")
    attach_dashboard_artifacts(study, tmp_path / "out", [])
    assert (tmp_path / "out" / "artifacts").is_dir()
    assert optuna.artifacts.get_all_artifact_meta(study) == []
    assert "No trial met the budget" in dashboard.get_note(study)


def test_attach_dashboard_artifacts_refuses_missing_files(mixed_study, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        attach_dashboard_artifacts(mixed_study, tmp_path, [tmp_path / "nope.yaml"])
    assert optuna.artifacts.get_all_artifact_meta(mixed_study) == []
