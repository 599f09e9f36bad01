"""``pareto.yaml``, the answer of a multi-objective search: one entry per Pareto-optimal trial,
its trial number, its objective values and its config (loadable as a :class:`NormConfig`),
nothing for dominated or over-budget trials. A study of known points, then a real search."""

from __future__ import annotations

import math

import optuna
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState

import autonorm
from autonorm import NormConfig
from autonorm import _trial_keys as keys
from autonorm.search import PARETO_FILE
from autonorm.search._export import export_bundle
from tests.lightning_models import TinyConvNet, TinyDataModule

LABELS = ["batchnorm", "groupnorm(groups=2)", "layernorm"]


def _two_objective_study(tmp_path, points: list[tuple[float, float, bool]]) -> optuna.Study:
    """A study minimizing (val_loss, params), a finished trial per ``(value 0, value 1,
    feasible)`` with the config a search records, ``bn1`` cycling through :data:`LABELS`."""
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'multi.db'}",
        study_name="multi",
        directions=["minimize", "minimize"],
    )
    study.set_user_attr(
        keys.STUDY_INFO, {"monitor": "val_loss", "objectives": ["val_loss", "params"]}
    )
    for i, (a, b, feasible) in enumerate(points):
        label = LABELS[i % 3]
        attrs = {keys.CONFIG: {"bn1": label}, **({} if feasible else {keys.FEASIBLE: False})}
        study.add_trial(
            optuna.trial.create_trial(
                params={"bn1": label},
                distributions={"bn1": CategoricalDistribution(LABELS)},
                values=[a, b],
                user_attrs=attrs,
            )
        )
    return study


def _front(path) -> list[dict]:
    front = yaml.safe_load(path.read_text())
    assert isinstance(front, list)
    return front


def test_pareto_yaml_lists_each_optimal_config_with_its_values(tmp_path):
    points = [
        (1.0, 5.0, True),  # front
        (2.0, 2.0, True),  # front
        (5.0, 1.0, True),  # front
        (3.0, 3.0, True),  # dominated by (2, 2)
        (0.5, 0.5, False),  # dominates everything, but over the budget
    ]
    study = _two_objective_study(tmp_path, points)
    out = tmp_path / "bundle"
    result = export_bundle(study, out, storage=None, elapsed=None, retrain=None)
    front = _front(out / PARETO_FILE)
    assert [(e["trial"], e["values"]) for e in front] == [
        (0, [1.0, 5.0]),
        (1, [2.0, 2.0]),
        (2, [5.0, 1.0]),
    ]
    for entry in front:
        config = NormConfig.from_dict(entry["config"], source=PARETO_FILE)
        assert config.choices == NormConfig({"bn1": LABELS[entry["trial"] % 3]}).choices
        assert config.metadata["trial"] == entry["trial"]
        assert config.metadata["values"] == entry["values"]
        assert config.metadata["study_name"] == "multi"
    # the file and the returned result agree; a multi-objective study has no single best
    assert [(c.metadata["trial"], v) for c, v in result.pareto] == [
        (e["trial"], e["values"]) for e in front
    ]
    assert result.best_config is None and not (out / "best_config.yaml").exists()


def _dominates(a: list[float], b: list[float], signs: list[float]) -> bool:
    return all(s * x <= s * y for s, x, y in zip(signs, a, b, strict=True)) and any(
        s * x < s * y for s, x, y in zip(signs, a, b, strict=True)
    )


def test_a_multi_objective_search_writes_its_pareto_front(tmp_path):
    """A real two-objective search (metric, parameter count): every entry is a finished trial
    with its values and config (that config builds a model of that many parameters), which no
    finished trial beats on both objectives; every finished trial left out is beaten by an
    entry (or repeats one's result)."""
    result = autonorm.search(
        TinyConvNet, TinyDataModule(), n_trials=5, trainer_kwargs={"max_epochs": 1},
        out_dir=tmp_path / "run", seed=0, space="minimal", objectives=["metric", "params"],
    )  # fmt: skip
    front = _front(result.out_dir / PARETO_FILE)
    assert front, "an empty Pareto front from a search whose trials completed"
    signs = [1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in result.study.directions]
    trials = {t.number: t for t in result.study.get_trials()}
    finished = [
        t
        for t in trials.values()
        if t.state == TrialState.COMPLETE
        and t.user_attrs.get(keys.FEASIBLE, True)
        and all(math.isfinite(v) for v in t.values)
    ]
    for entry in front:
        trial = trials[entry["trial"]]
        assert entry["values"] == trial.values
        config = NormConfig.from_dict(entry["config"], source=PARETO_FILE)
        assert config.choices == NormConfig(trial.user_attrs[keys.CONFIG]).choices
        assert not any(_dominates(t.values, trial.values, signs) for t in finished)
        # the params objective is the parameter count of the model the config builds
        model = autonorm.apply_config(TinyConvNet(), config)
        assert entry["values"][1] == sum(p.numel() for p in model.parameters())
    listed = {e["trial"] for e in front}
    for trial in finished:
        if trial.number in listed:
            continue
        beaten = any(_dominates(trials[n].values, trial.values, signs) for n in listed)
        repeats = trial.user_attrs.get(keys.REUSED_FROM) in listed
        assert beaten or repeats, (trial.number, trial.values, front)
    assert len(listed) == len(front)  # each trial once
    assert sorted(listed) == [e["trial"] for e in front]  # in trial order
    assert len(result.pareto) == len(front)
