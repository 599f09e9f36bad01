"""When uniform SwitchableNorm wins, the bundle also holds the best config of plain layers (it
ships without autonorm, folds where BatchNorm does), with both values and both inference costs
in the summary and the report. Real SQLite studies, the real export."""

from __future__ import annotations

import json

import optuna

from autonorm import NormChoice, NormConfig
from autonorm._trial_keys import CONFIG, STUDY_INFO
from autonorm.search._export import DEPLOY_CONFIG_FILE, export_bundle

CHOICES = ["switchable", "groupnorm(groups=2)", "batchnorm"]


def _study(tmp_path, name: str, values: dict[str, float]) -> optuna.Study:
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}", study_name=name, direction="maximize"
    )
    slot = {"name": "a", "kind": "BatchNorm2d", "num_features": 8, "layout": "channels_first"}
    study.set_user_attr(STUDY_INFO, {"monitor": "val_acc", "mode": "max", "slots": [slot]})
    distribution = optuna.distributions.CategoricalDistribution(CHOICES)
    for choice, value in values.items():
        study.add_trial(
            optuna.trial.create_trial(
                params={"a": choice},
                distributions={"a": distribution},
                value=value,
                user_attrs={CONFIG: {"a": choice}},
            )
        )
    return study


def test_a_switchable_winner_comes_with_the_best_config_of_plain_layers(tmp_path):
    out = tmp_path / "bundle"
    study = _study(tmp_path, "s", {"switchable": 0.9, "groupnorm(groups=2)": 0.8, "batchnorm": 0.7})
    result = export_bundle(study, out, storage=None, elapsed=None, retrain=None)
    assert result.best_config.choices["a"].name == "switchable"
    deploy = NormConfig.load(out / DEPLOY_CONFIG_FILE)
    assert deploy.choices == {"a": NormChoice("groupnorm", {"groups": 2})}
    assert deploy.metadata["value"] == 0.8 and deploy.metadata["trial"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["deployable"]["trial"] == 1 and summary["deployable"]["value"] == 0.8
    assert summary["best_value"] == 0.9
    assert "Best config of plain layers" in (out / "report.html").read_text()

    # a plain winner needs no second answer: the file of the earlier export goes
    plain = _study(tmp_path, "t", {"switchable": 0.5, "batchnorm": 0.7})
    export_bundle(plain, out, storage=None, elapsed=None, retrain=None)
    assert not (out / DEPLOY_CONFIG_FILE).exists()
    assert json.loads((out / "summary.json").read_text())["deployable"] is None
