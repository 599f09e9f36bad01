"""A config the user names as the default is kept as the model's own norms are: screened right
after them, always trained in full, and replaced only on paired evidence (the own norms too)."""

from __future__ import annotations

import optuna
import pytest

import autonorm
from autonorm import AutoNormError, NormConfig
from autonorm import _trial_keys as keys
from autonorm.report import config_runs
from tests.lightning_models import TinyConvNet, TinyDataModule
from tests.report.studies import paired_runs_study

OWN = "own"
DEFAULT = "default"


GUARDS = {OWN: keys.OWN_NORMS_GUARD, DEFAULT: keys.DEFAULT_GUARD}


def _chosen(values: dict[str, list[float]]) -> str | None:
    return config_runs(paired_runs_study(values, GUARDS))[0].label


def test_the_named_default_has_the_last_word_without_evidence():
    # the own norms and the default tie on their paired runs: the default is kept
    assert _chosen({OWN: [0.70, 0.80], DEFAULT: [0.72, 0.78]}) == DEFAULT
    # a single challenger run a hair above: the default is kept
    assert _chosen({OWN: [0.69, 0.79], DEFAULT: [0.70, 0.80], "x": [0.71]}) == DEFAULT


def test_paired_evidence_replaces_the_named_default():
    # the own norms better on both paired runs: evidence replaces the default
    assert _chosen({OWN: [0.72, 0.83], DEFAULT: [0.70, 0.80]}) == OWN
    # a challenger better on both paired runs than both guarded configs
    assert _chosen({OWN: [0.60, 0.70], DEFAULT: [0.70, 0.80], "x": [0.74, 0.85]}) == "x"


def test_an_older_studys_true_marks_the_own_norms():
    study = paired_runs_study(
        {OWN: [0.70, 0.80], "x": [0.71]}, {OWN: True}
    )  # written before the ranks
    assert config_runs(study)[0].guard == keys.OWN_NORMS_GUARD
    assert config_runs(study)[0].label == OWN


def _search(tmp_path, **kwargs):
    options = dict(
        trainer_kwargs={"max_epochs": 3},
        out_dir=tmp_path / "run",
        seed=0,
        space="cnn",
        budget={"trainings": 4},
    )
    return autonorm.search(TinyConvNet, TinyDataModule(), **{**options, **kwargs})


def test_a_search_screens_the_default_after_the_own_norms_and_trains_it_in_full(tmp_path):
    default = NormConfig({"bn1": "groupnorm(groups=2)", "bn2": "layernorm"})  # head_norm: own
    path = default.save(tmp_path / "default.yaml")
    result = _search(tmp_path, default_config=path)
    trials = result.study.trials
    assert [t.user_attrs.get(keys.BASELINE) for t in trials[:2]] == ["own norms", "default config"]
    assert trials[1].params == {
        "bn1": "groupnorm(groups=2)",
        "bn2": "layernorm",
        "head_norm": "layernorm",
    }
    assert trials[1].user_attrs[keys.INCUMBENT] == keys.DEFAULT_GUARD
    full = [
        t
        for t in trials
        if t.params == trials[1].params
        and t.state == optuna.trial.TrialState.COMPLETE
        and t.user_attrs.get(keys.STAGE) != "screen"
    ]
    assert full  # promoted to the full schedule whatever its rung value
    info = result.study.user_attrs["autonorm"]
    assert set(info["default_config"]) == {"bn1", "bn2"}
    # the same folder with another default is another experiment: refused, naming it
    with pytest.raises(AutoNormError, match="default_config"):
        _search(tmp_path, default_config=NormConfig({"bn1": "layernorm"}))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"nope": "layernorm"},
            r"default_config names slots the search does not choose: \['nope'\]",
        ),
        ({"bn1": "dyt"}, r"default_config: slot\(s\) \['bn1'\] get dyt, which the search space"),
    ],
)
def test_a_default_the_search_cannot_give_exactly_is_refused(tmp_path, config, message):
    with pytest.raises(AutoNormError, match=message):
        _search(tmp_path, default_config=NormConfig(config))


def test_a_default_that_is_no_config_is_refused():
    with pytest.raises(ValueError, match="`default_config` must be a NormConfig or its YAML"):
        autonorm.search(TinyConvNet, TinyDataModule(), default_config=3)
